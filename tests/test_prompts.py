"""Prompts and label masks against hand-written official strings (the worked examples of the official code's
spec) and independent whole-string tokenizations."""

import pytest

from memvp_ds.data.prompts import (
    IMAGE_MARK,
    build_segments,
    conversation_segments,
    encode_segments,
    scienceqa_prompt,
    scienceqa_target,
    take_image_marks,
)
from memvp_ds.data.tokenizer import load_tokenizer, train_tokenizer

# (fields, official training prompt, official target, official evaluation prompt with the caption)
WORKED_EXAMPLES = [
    pytest.param(  # hint, 2 options, no image
        {"question": "Select the fish below.", "hint": "Fish live underwater. They have fins, not limbs.",
         "choices": ["tiger shark", "red-eyed tree frog"], "answer": 0, "caption": ""},
        "Question: Select the fish below.\nContext: Fish live underwater. They have fins, not limbs.\n"
        "Options: (A) tiger shark (B) red-eyed tree frog\nResponse:",
        "The answer is A.",
        "Question: Select the fish below.\nContext: Fish live underwater. They have fins, not limbs.\n"
        "Options: (A) tiger shark (B) red-eyed tree frog\nResponse:The answer is",
        id="hint-2-options"),
    pytest.param(  # no hint, 4 options, an image with a caption: N/A in training, the caption at evaluation
        {"question": "Which of these states is farthest north?", "hint": "",
         "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"], "answer": 0,
         "caption": "An aerial view of a map of the united states."},
        "Question: Which of these states is farthest north?\nContext: N/A\n"
        "Options: (A) West Virginia (B) Louisiana (C) Arizona (D) Oklahoma\nResponse:",
        "The answer is A.",
        "Question: Which of these states is farthest north?\nContext: An aerial view of a map of the united states.\n"
        "Options: (A) West Virginia (B) Louisiana (C) Arizona (D) Oklahoma\nResponse:The answer is",
        id="caption-4-options"),
    pytest.param(  # double spaces collapse once; the hint's trailing spaces go with the context strip
        {"question": "What is the  mass of a  grape?", "hint": "Select the  best estimate.   ",
         "choices": ["3 grams", "3  kilograms"], "answer": 0},
        "Question: What is the mass of a grape?\nContext: Select the best estimate.\n"
        "Options: (A) 3 grams (B) 3 kilograms\nResponse:",
        "The answer is A.",
        "Question: What is the mass of a grape?\nContext: Select the best estimate.\n"
        "Options: (A) 3 grams (B) 3 kilograms\nResponse:The answer is",
        id="double-spaces"),
    pytest.param(  # an embedded newline, 3 options, answer B
        {"question": "Which tense does the sentence use?\nMona will print her name with care.", "hint": None,
         "choices": ["present tense", "future tense", "past tense"], "answer": 1},
        "Question: Which tense does the sentence use?\nMona will print her name with care.\nContext: N/A\n"
        "Options: (A) present tense (B) future tense (C) past tense\nResponse:",
        "The answer is B.",
        "Question: Which tense does the sentence use?\nMona will print her name with care.\nContext: N/A\n"
        "Options: (A) present tense (B) future tense (C) past tense\nResponse:The answer is",
        id="newline-3-options"),
    pytest.param(  # triple spaces become double (one pass), 5 options; hint and caption joined by one space
        {"question": "Which  word   fits?", "hint": "Read the text.", "caption": "A  page of a book.",
         "choices": ["a", "b", "c   d", "e", "f"], "answer": 4},
        "Question: Which word  fits?\nContext: Read the text.\nOptions: (A) a (B) b (C) c  d (D) e (E) f\nResponse:",
        "The answer is E.",
        "Question: Which word  fits?\nContext: Read the text. A page of a book.\n"
        "Options: (A) a (B) b (C) c  d (D) e (E) f\nResponse:The answer is",
        id="triple-spaces-5-options"),
]


@pytest.mark.parametrize("fields, prompt, target, eval_prompt", WORKED_EXAMPLES)
def test_official_prompt_target_and_evaluation_prompt(fields, prompt, target, eval_prompt):
    assert build_segments(fields, "qcm_a") == [(prompt, False), (target, True)]
    assert build_segments(fields, "qcm_a", with_target=False, use_caption=True) == [(eval_prompt, False)]
    without_caption = build_segments(fields, "qcm_a", with_target=False, use_caption=False)
    assert without_caption == [(prompt + "The answer is", False)]


def test_training_never_uses_the_caption(tokenizer_dir):
    """The training encoder (SampleEncoder's default, as the trainer builds it) leaves the caption out."""
    import json

    from memvp_ds.data.collate import SampleEncoder

    fields, prompt, target, _ = WORKED_EXAMPLES[1].values
    tok = load_tokenizer(tokenizer_dir)
    sample = SampleEncoder(tok, "qcm_a", 512, 16, 32)({"__key__": "k", "json": json.dumps(fields).encode()})
    assert tok.decode(sample.input_ids, skip_special_tokens=True) == prompt + target
    assert scienceqa_prompt("Q?", ["x", "y"], "", "A cat.").split("\n")[1] == "Context: A cat."
    assert scienceqa_target(2) == "The answer is C."


@pytest.mark.parametrize("fields, prompt, target, eval_prompt", WORKED_EXAMPLES[:3])
def test_prompt_and_target_are_tokenized_as_one_string(tokenizer_dir, fields, prompt, target, eval_prompt):
    """ids = BOS + encode(prompt + target) + EOS; the loss starts after the prompt tokenized alone."""
    tok = load_tokenizer(tokenizer_dir)
    enc = encode_segments(tok, build_segments(fields, "qcm_a"), max_seq_len=512)
    whole = tok.encode(prompt + target, add_special_tokens=False)
    prompt_len = 1 + len(tok.encode(prompt, add_special_tokens=False))
    assert enc.input_ids == [tok.bos_token_id] + whole + [tok.eos_token_id]
    assert enc.labels[:prompt_len] == [-100] * prompt_len
    assert enc.labels[prompt_len:] == enc.input_ids[prompt_len:]
    assert tok.decode(enc.labels[prompt_len:-1]) == target and enc.labels[-1] == tok.eos_token_id
    evaluated = encode_segments(tok, build_segments(fields, "qcm_a", with_target=False), 512)
    assert evaluated.input_ids == [tok.bos_token_id] + tok.encode(prompt + "The answer is", add_special_tokens=False)


@pytest.fixture(scope="module")
def gpt2_style_tokenizer(tmp_path_factory):
    """A GPT-2-style byte-level BPE that puts a space before the text (add_prefix_space)."""
    texts = [f"USER: What is on the {p}?\nASSISTANT: A {c} {s}.\nQuestion: Which {s}?\nResponse:The answer is {l}."
             for p in ("left", "right", "top") for c in ("red", "blue") for s in ("circle", "square") for l in "ABC"]
    out = tmp_path_factory.mktemp("gpt2_style")
    train_tokenizer(texts * 3, str(out), vocab_size=360, add_prefix_space=True)
    return load_tokenizer(str(out))


def test_whole_string_tokenization_keeps_words_whole_on_a_gpt2_style_bpe(gpt2_style_tokenizer):
    tok = gpt2_style_tokenizer
    turns = [{"from": "human", "value": "<image>\nWhat is on the left?"}, {"from": "gpt", "value": "A red circle."},
             {"from": "human", "value": "And right?"}, {"from": "gpt", "value": "A blue square."}]
    segments = conversation_segments(turns)
    text = "".join(s for s, _ in take_image_marks(segments)[0])
    assert text == "USER: What is on the left?\nASSISTANT: A red circle.\nUSER: And right?\nASSISTANT: A blue square.\n"
    # The hazard: a prompt that ends in a space tokenizes to a lone space token on its own.
    assert tok.tokenize("ASSISTANT: ")[-1] == "Ġ"
    enc = encode_segments(tok, segments, 512)
    assert enc.input_ids == [tok.bos_token_id] + tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    assert "Ġ" not in tok.convert_ids_to_tokens(enc.input_ids)
    answers = [t for t, label in zip(enc.input_ids, enc.labels) if label != -100]
    assert tok.decode(answers[:-1]) == " A red circle.\n A blue square.\n"
    qcm = WORKED_EXAMPLES[0].values
    enc = encode_segments(tok, build_segments(qcm[0], "qcm_a"), 512)
    assert enc.input_ids[1:-1] == tok.encode(qcm[1] + qcm[2], add_special_tokens=False)
    assert tok.decode([t for t in enc.labels if t >= 0][:-1]) == "The answer is A."


def test_a_boundary_inside_a_token_is_refused(gpt2_style_tokenizer):
    """A prompt ending in a space is not a token prefix of prompt + answer: the mask would be wrong."""
    with pytest.raises(ValueError, match="merges across the segment boundary"):
        encode_segments(gpt2_style_tokenizer, [("USER: hi\nASSISTANT: ", False), ("A red circle.", True)], 512)


def test_a_tokenizer_without_bos_starts_with_the_text(tmp_path):
    train_tokenizer(["Question: Which?\nResponse:The answer is A."] * 20, str(tmp_path), vocab_size=300, with_bos=False)
    tok = load_tokenizer(str(tmp_path))
    assert tok.bos_token_id is None and tok.eos_token_id is not None
    fields = WORKED_EXAMPLES[0].values[0]
    enc = encode_segments(tok, build_segments(fields, "qcm_a"), 512)
    prompt, target = WORKED_EXAMPLES[0].values[1:3]
    prompt_len = len(tok.encode(prompt, add_special_tokens=False))
    assert enc.input_ids == tok.encode(prompt + target, add_special_tokens=False) + [tok.eos_token_id]
    assert enc.labels[:prompt_len] == [-100] * prompt_len and enc.labels[prompt_len:] == enc.input_ids[prompt_len:]
    cut = encode_segments(tok, build_segments(fields, "qcm_a"), 20)
    assert cut.input_ids == enc.input_ids[-20:]


def test_truncation_keeps_bos_and_the_whole_answer(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    fields = {"question": "What colour " * 40 + "?", "choices": ["red", "blue"], "hint": "", "answer": 0}
    full = encode_segments(tok, build_segments(fields, "qcm_a"), max_seq_len=10_000)
    cut = encode_segments(tok, build_segments(fields, "qcm_a"), max_seq_len=40)
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
    assert segments[0] == (f"USER: {IMAGE_MARK}What is on the left?\nASSISTANT:", False)  # where the tag was
    assert take_image_marks(segments[:1]) == ([("USER: What is on the left?\nASSISTANT:", False)], [6])
    assert [s[1] for s in segments] == [False, True, False, True]
    assert build_segments({"conversations": turns}, "conversation", with_target=False) == segments[:-1]
    tok = load_tokenizer(tokenizer_dir)
    enc = encode_segments(tok, segments, 512)
    answer_ids = [t for t, l in zip(enc.input_ids, enc.labels) if l != -100]
    assert tok.decode(answer_ids[:-1]) == " A red circle.\n A square.\n"
    with pytest.raises(ValueError, match="role 'bot' is not one of"):
        conversation_segments([{"from": "bot", "value": "x"}])


def test_sharegpt_roles_and_keys_give_the_llava_segments_and_a_system_turn_has_no_loss(tokenizer_dir):
    llava = [{"from": "human", "value": "<image>\nWhat is on the left?"}, {"from": "gpt", "value": "A red circle."}]
    sharegpt = [{"role": "user", "content": "<image>\nWhat is on the left?"},
                {"role": "assistant", "content": "A red circle."}]
    mixed = [{"from": "user", "value": "<image> What is on the left?"}, {"from": "assistant", "value": "A red circle."}]
    assert conversation_segments(sharegpt) == conversation_segments(mixed) == conversation_segments(llava)
    with_system = conversation_segments([{"role": "system", "content": "Answer briefly."}, *sharegpt])
    assert with_system[0] == ("Answer briefly.\n", False) and with_system[1:] == conversation_segments(llava)
    tok = load_tokenizer(tokenizer_dir)
    enc = encode_segments(tok, with_system, 512)
    answer_ids = [t for t, l in zip(enc.input_ids, enc.labels) if l != -100]
    assert tok.decode(answer_ids[:-1]) == " A red circle.\n"  # the system text carries no loss
    with pytest.raises(ValueError, match="needs a 'from' or 'role'"):
        conversation_segments([{"speaker": "user", "value": "x"}])


def test_missing_tokenizer_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        load_tokenizer(str(tmp_path / "absent"))
