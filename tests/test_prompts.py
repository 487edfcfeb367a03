import pytest

from memvp_ds.data.prompts import (
    conversation_segments,
    encode_segments,
    scienceqa_prompt,
    scienceqa_target,
)
from memvp_ds.data.tokenizer import load_tokenizer


def test_scienceqa_qcm_a_format():
    prompt = scienceqa_prompt("Which is red?", ["apple", "sky", "grass"], "")
    assert prompt == "Question: Which is red?\nContext: N/A\nOptions: (A) apple (B) sky (C) grass\n"
    assert scienceqa_prompt("Q?", ["x", "y"], "A hint.").split("\n")[1] == "Context: A hint."
    assert scienceqa_target(2) == "Answer: The answer is C."


def test_loss_only_on_answer_and_eos(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    prompt, target = scienceqa_prompt("What colour?", ["red", "blue"], None), scienceqa_target(1)
    enc = encode_segments(tok, [(prompt, False), (target, True)], max_seq_len=512)
    prompt_len = 1 + len(tok.encode(prompt, add_special_tokens=False))
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[-1] == tok.eos_token_id
    assert enc.labels[:prompt_len] == [-100] * prompt_len
    assert enc.labels[prompt_len:] == enc.input_ids[prompt_len:]
    assert tok.decode(enc.labels[prompt_len:-1]) == target


def test_truncation_keeps_bos_and_the_whole_answer(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    prompt, target = scienceqa_prompt("What colour " * 40 + "?", ["red", "blue"], None), scienceqa_target(0)
    full = encode_segments(tok, [(prompt, False), (target, True)], max_seq_len=10_000)
    cut = encode_segments(tok, [(prompt, False), (target, True)], max_seq_len=40)
    assert len(cut.input_ids) == 40 and cut.input_ids[0] == tok.bos_token_id
    assert cut.input_ids[1:] == full.input_ids[-39:] and cut.labels[1:] == full.labels[-39:]


def test_conversation_segments_strip_image_and_mask_human_turns(tokenizer_dir):
    turns = [
        {"from": "human", "value": "<image>\nWhat is on the left?"},
        {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": "And right?"},
        {"from": "gpt", "value": "A square."},
    ]
    segments = conversation_segments(turns)
    assert segments[0] == ("USER: What is on the left?\nASSISTANT: ", False)
    assert [s[1] for s in segments] == [False, True, False, True]
    tok = load_tokenizer(tokenizer_dir)
    enc = encode_segments(tok, segments, 512)
    answer_ids = [t for t, l in zip(enc.input_ids, enc.labels) if l != -100]
    assert tok.decode(answer_ids[:-1]) == "A red circle.\nA square.\n"
    with pytest.raises(ValueError, match="role 'bot' is not one of"):
        conversation_segments([{"from": "bot", "value": "x"}])


def test_sharegpt_roles_and_keys_give_the_llava_segments_and_a_system_turn_has_no_loss(tokenizer_dir):
    llava = [{"from": "human", "value": "<image>\nWhat is on the left?"}, {"from": "gpt", "value": "A red circle."}]
    sharegpt = [{"role": "user", "content": "<image>\nWhat is on the left?"},
                {"role": "assistant", "content": "A red circle."}]
    mixed = [{"from": "user", "value": "What is on the left?"}, {"from": "assistant", "value": "A red circle."}]
    assert conversation_segments(sharegpt) == conversation_segments(mixed) == conversation_segments(llava)
    with_system = conversation_segments([{"role": "system", "content": "Answer briefly."}, *sharegpt])
    assert with_system[0] == ("Answer briefly.\n", False) and with_system[1:] == conversation_segments(llava)
    tok = load_tokenizer(tokenizer_dir)
    enc = encode_segments(tok, with_system, 512)
    answer_ids = [t for t, l in zip(enc.input_ids, enc.labels) if l != -100]
    assert tok.decode(answer_ids[:-1]) == "A red circle.\n"  # the system text carries no loss
    with pytest.raises(ValueError, match="needs a 'from' or 'role'"):
        conversation_segments([{"speaker": "user", "value": "x"}])


def test_missing_tokenizer_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        load_tokenizer(str(tmp_path / "absent"))
