"""data.prompt_format=chat_template: conversations rendered by the tokenizer's own chat template, the loss on
exactly the assistant turns' tokens, checked token by token against the template's own rendering and its own
assistant-token mask (transformers' ``{% generation %}`` blocks) for a Llama-3-style and a Qwen2-style
template (tests/chat_tokenizers.py)."""

import json

import pytest

from memvp_ds import ConfigError
from memvp_ds.data.collate import SampleEncoder
from memvp_ds.data.prompts import IGNORE_INDEX, encode_prompt, prompt_format
from memvp_ds.data.tokenizer import load_tokenizer
from tests.chat_tokenizers import chat_tokenizer

CONVERSATION = [
    {"from": "human", "value": "What colour is the circle on the left?"},
    {"from": "gpt", "value": "It is red."},
    {"from": "human", "value": "And the square on the right?"},
    {"from": "gpt", "value": "It is blue. You are a helpful assistant."},
]
WITH_SYSTEM = [{"from": "system", "value": "You are a helpful assistant."}, *CONVERSATION[:2]]
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>"}


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def styled(request, tmp_path_factory):
    style = request.param
    return style, load_tokenizer(chat_tokenizer(str(tmp_path_factory.mktemp(style)), style))


def _messages(turns):
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in turns]


@pytest.mark.parametrize("turns", [CONVERSATION, WITH_SYSTEM], ids=["two_answers", "system_turn"])
def test_tokens_and_loss_are_the_templates_own(styled, turns):
    style, tokenizer = styled
    encoded = encode_prompt(tokenizer, {"conversations": turns}, "chat_template", max_seq_len=512)
    reference = tokenizer.apply_chat_template(_messages(turns), tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    rendered = tokenizer.apply_chat_template(_messages(turns), tokenize=False)
    assert encoded.input_ids == list(reference["input_ids"])
    assert encoded.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert len(encoded.labels) == len(reference["assistant_masks"])
    for token, label, is_assistant in zip(encoded.input_ids, encoded.labels, reference["assistant_masks"]):
        assert label == (token if is_assistant else IGNORE_INDEX)
    # the answers and their end-of-turn tokens, nothing else; BOS as the template writes it (once, or none)
    answers = [t["value"] for t in turns if t["from"] == "gpt"]
    target = tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])
    assert target == "".join(answer + END_OF_TURN[style] for answer in answers)
    bos = [t for t in encoded.input_ids if tokenizer.bos_token_id is not None and t == tokenizer.bos_token_id]
    assert len(bos) == (1 if style == "llama3" else 0) and encoded.input_ids[0] != tokenizer.eos_token_id


def test_training_and_evaluation_encoders(styled):
    """The real encoders: training cuts after the last answer's end-of-turn token (Qwen2's newline after it
    carries no loss); evaluation's prompt is the template's rendering up to the last answer with its
    generation prompt."""
    style, tokenizer = styled
    raw = {"__key__": "s0", "json": json.dumps({"conversations": CONVERSATION}).encode()}
    sample = SampleEncoder(tokenizer, "chat_template", 512, 16, 32)(raw)
    assert sample.input_ids[-1] == sample.labels[-1] == tokenizer.convert_tokens_to_ids(END_OF_TURN[style])
    prompt = SampleEncoder(tokenizer, "chat_template", 512, 16, 32, with_target=False)(raw)
    expected = tokenizer.apply_chat_template(_messages(CONVERSATION[:-1]), tokenize=False, add_generation_prompt=True)
    assert prompt.input_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert expected.endswith("assistant<|end_header_id|>\n\n" if style == "llama3" else "<|im_start|>assistant\n")


def test_truncation_keeps_bos_and_the_answer(styled):
    style, tokenizer = styled
    full = encode_prompt(tokenizer, {"conversations": CONVERSATION}, "chat_template", 512)
    cut = encode_prompt(tokenizer, {"conversations": CONVERSATION}, "chat_template", len(full.input_ids) - 5)
    keep = 1 if style == "llama3" else 0
    assert cut.input_ids == full.input_ids[:keep] + full.input_ids[keep + 5:]
    assert cut.labels == full.labels[:keep] + full.labels[keep + 5:]


def test_a_tokenizer_without_a_template_is_refused(tokenizer_dir):
    with pytest.raises(ConfigError, match="prompt_format=chat_template: the tokenizer at .* has no chat template"):
        prompt_format("chat_template").check_tokenizer(load_tokenizer(tokenizer_dir), tokenizer_dir)


def test_predict_asks_a_chat_template_export_through_its_template(tmp_path):
    """memvp-predict on an instruct export: the question (options typed after it) is one user turn rendered by
    the template, and the answer is generate's on that prompt."""
    import torch

    from memvp_ds.data.collate import collate
    from memvp_ds.export import write_export
    from memvp_ds.predict import answer
    from tests.conftest import TINY_VIT, tiny_config, tiny_model

    tokenizer_dir = chat_tokenizer(str(tmp_path / "tok"), "qwen2")
    options = [f"data.tokenizer={tokenizer_dir}", "data.prompt_format=chat_template"]
    model = tiny_model("memvp")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    weights = str(tmp_path / "chat.safetensors")
    write_export({n: p.detach().contiguous() for n, p in model.trainable_parameters().items()}, weights,
                 tiny_config("memvp", *options), {"model": TINY_VIT, "pretrained": "random", "image_size": 64})
    tokenizer = load_tokenizer(tokenizer_dir)
    turn = {"from": "human", "value": "What colour is the circle?\n(A) red (B) blue"}
    raw = {"__key__": "q", "json": json.dumps({"conversations": [turn]}).encode()}
    batch = collate([SampleEncoder(tokenizer, "chat_template", 128, 16, 32, with_target=False)(raw)],
                    tokenizer.pad_token_id, (16, 32), left_pad=True)
    assert tokenizer.decode(batch["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        tokens = model.eval().generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6,
                                       eos_token_id=tokenizer.eos_token_id)[0].tolist()
    expected = tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id], skip_special_tokens=True)
    assert answer(weights, None, "What colour is the circle?", ["red", "blue"], max_new_tokens=6) == expected
