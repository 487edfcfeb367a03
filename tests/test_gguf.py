"""GGUF LLMs (model.llm.path = a .gguf file): a tiny LLaMA written here with the ``gguf`` package, in llama.cpp's
tensor names and layout, loads through transformers' GGUF reader into the same model as its safetensors twin,
and its tokenizer into the same tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e .[test])")

from memvp_ds.config import ConfigError, LLMConfig  # noqa: E402
from memvp_ds.data.tokenizer import load_tokenizer, tokenizer_path  # noqa: E402
from memvp_ds.model.llm import load_frozen_llm, num_decoder_layers  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.helpers import run_train, scalars, train_overrides  # noqa: E402

# llama.cpp's names for a LLaMA block's tensors (convert_hf_to_gguf.py), keyed by the HF module path.
BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
ENDOFTEXT = "<|endoftext|>"


def _rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows with each head's rotary halves interleaved (transformers undoes this on load)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(model, tokenizer_dir: str, path: Path, matrix_type: str) -> None:
    """Write ``model`` (an HF LlamaForCausalLM) and the tokenizer in ``tokenizer_dir`` as a GGUF file: norms in
    F32, the matrices in ``matrix_type`` (F32 or F16), metadata under llama.cpp's keys."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    spec = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    # transformers' GGUF reader of "gpt2" vocabularies adds GPT-2's <|endoftext|> where it is missing: the
    # file carries it as its last token, so the vocabulary read back is the file's.
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1]) + [(ENDOFTEXT, len(spec["model"]["vocab"]))]
    special = {t["content"] for t in spec["added_tokens"]} | {ENDOFTEXT}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    token_ids = {token: i for token, i in vocab}
    config = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(token_ids[config["bos_token"]])
    writer.add_eos_token_id(token_ids[config["eos_token"]])
    writer.add_unk_token_id(token_ids[config["unk_token"]])
    writer.add_pad_token_id(token_ids[config["pad_token"]])

    def add(name: str, tensor: torch.Tensor, matrix: bool) -> None:
        array = tensor.detach().float().numpy()
        writer.add_tensor(name, array.astype(np.float16) if matrix and matrix_type == "F16" else array)

    add("token_embd.weight", model.model.embed_tokens.weight, True)
    add("output_norm.weight", model.model.norm.weight, False)
    add("output.weight", model.lm_head.weight, True)
    for i, layer in enumerate(model.model.layers):
        for module_path, short in BLOCK_TENSORS.items():
            weight = layer.get_submodule(module_path).weight.detach().float().numpy()
            if short == "attn_q":
                weight = _rope_permute(weight, cfg.num_attention_heads)
            elif short == "attn_k":
                weight = _rope_permute(weight, cfg.num_key_value_heads)
            add(f"blk.{i}.{short}.weight", torch.from_numpy(weight), weight.ndim == 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_llama(vocab_size: int, fp16_matrices: bool):
    """The tiny recipe's LLaMA with random weights (untied head); with ``fp16_matrices`` every matrix rounded
    to fp16, the values an F16 GGUF holds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    inline = dict(tiny_config().model.llm.config)
    inline.update(vocab_size=vocab_size, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(inline.pop("model_type"), **inline))
    if fp16_matrices:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.ndim == 2:
                    parameter.copy_(parameter.half().float())
    return model


@pytest.fixture(scope="module", params=["F32", "F16"])
def twins(request, tmp_path_factory, tokenizer_dir):
    """(safetensors directory, GGUF file) holding the same tiny LLaMA."""
    root = tmp_path_factory.mktemp(f"gguf_{request.param}")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = _tiny_llama(len(tokenizer) + 1, request.param == "F16")  # + <|endoftext|>
    model.save_pretrained(root / "hf")
    write_llama_gguf(model, tokenizer_dir, root / "tiny.gguf", request.param)
    return root / "hf", root / "tiny.gguf"


def test_gguf_llm_equals_its_safetensors_twin(twins):
    hf_dir, gguf_path = twins
    reference = load_frozen_llm(LLMConfig(path=str(hf_dir), dtype="float32"))
    from_file = load_frozen_llm(LLMConfig(path=str(gguf_path), dtype="float32"))
    in_dir = load_frozen_llm(LLMConfig(path=str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32"))
    assert not any(p.requires_grad for m in (from_file, in_dir) for p in m.parameters())
    assert num_decoder_layers(LLMConfig(path=str(gguf_path))) == reference.config.num_hidden_layers
    ids = torch.randint(0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        assert torch.equal(from_file(input_ids=ids).logits, expected)
        assert torch.equal(in_dir(input_ids=ids).logits, expected)


def test_gguf_tokenizer_equals_the_trained_one(twins, tokenizer_dir):
    _, gguf_path = twins
    trained = load_tokenizer(tokenizer_dir)
    cfg = tiny_config("memvp", f"model.llm.path={gguf_path.parent}", f"model.llm.gguf_file={gguf_path.name}",
                      "model.llm.config=null")
    assert tokenizer_path(cfg) == str(gguf_path)
    from_file = load_tokenizer(tokenizer_path(cfg))
    texts = ["Question: What colour is the circle at the left?\nOptions: (A) red (B) blue\nAnswer: The answer is B.",
             "  odd   spacing\tand unseen wörds"]
    for text in texts:
        assert from_file(text).input_ids == trained(text).input_ids
    assert len(from_file) == len(trained) + 1 and from_file.convert_ids_to_tokens(len(trained)) == ENDOFTEXT
    assert (from_file.bos_token, from_file.eos_token, from_file.pad_token) == (
        trained.bos_token, trained.eos_token, trained.pad_token)


def test_missing_gguf_package_is_one_error_naming_the_option(twins, monkeypatch):
    _, gguf_path = twins
    monkeypatch.setitem(sys.modules, "gguf", None)  # what importlib reports for an uninstalled package
    with pytest.raises(ConfigError, match=r"model\.llm\.path: .*tiny\.gguf.*'gguf' package \(pip install gguf\)"):
        num_decoder_layers(LLMConfig(path=str(gguf_path)))
    with pytest.raises(ConfigError, match=r"data\.tokenizer: .*'gguf' package"):
        load_tokenizer(str(gguf_path))


def test_bad_gguf_options_name_the_option(tmp_path):
    with pytest.raises(ConfigError, match="model.llm.path: GGUF file not found: .*missing.gguf"):
        num_decoder_layers(LLMConfig(path=str(tmp_path / "missing.gguf")))
    with pytest.raises(ConfigError, match="model.llm.path: GGUF file not found: .*other.gguf"):
        num_decoder_layers(LLMConfig(path=str(tmp_path), gguf_file="other.gguf"))
    with pytest.raises(ConfigError, match="model.llm.gguf_file: needs model.llm.path"):
        LLMConfig(gguf_file="model.gguf")


@pytest.mark.slow
def test_memvp_trains_on_a_gguf_llm_with_its_tokenizer(twins, dataset, tmp_path):
    """memvp-train with model.llm.path and data.tokenizer both naming the GGUF file (no tokenizer directory)."""
    _, gguf_path = twins
    overrides = train_overrides(dataset, tmp_path / "run", f"model.llm.path={gguf_path}", "model.llm.config=null",
                                f"data.tokenizer={gguf_path}", "train.max_steps=3", "train.save_interval=3")
    run_train(overrides)
    assert len(scalars(tmp_path / "run", "train/loss")) == 3
    assert (tmp_path / "run" / "export" / "trainable.safetensors").is_file()
