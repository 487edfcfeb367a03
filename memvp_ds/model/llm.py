"""Loading the frozen language model and checking that its blocks have the shape MemVP needs."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from memvp_ds.config import ConfigError, LLMConfig
from memvp_ds.gguf_files import gguf_location

# Extra norms that sit around the FFN in "sandwich-norm" blocks (Gemma 2/3, OLMo 2). There the FFN output
# is normalised before the residual add, so a memory term added to it would not be the MemVP formulation.
_SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm", "post_mlp_layernorm")
_REQUIRED = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


class UnsupportedArchitectureError(ValueError):
    """The chosen LLM does not have LLaMA's pre-norm decoder block."""


def decoder_layers(llm: PreTrainedModel) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM, after checking each is a LLaMA-style pre-norm block.

    A block must compute ``h = x + attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))``:
    MemVP extends ``mlp`` with visual key/value memory and reads its input, the normalised ``h``.
    """
    arch = type(llm).__name__
    if getattr(llm.config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(f"{arch} is an encoder-decoder model; MemVP needs a decoder-only LLM")
    layers = getattr(llm.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(
            f"{arch} has no 'layers' list of decoder blocks in its base model; supported: LLaMA-style decoders "
            "(Llama 1/2/3, Mistral, Qwen2, ...)"
        )
    block = layers[0]
    missing = [name for name in _REQUIRED if not hasattr(block, name)]
    sandwich = [name for name in _SANDWICH_NORMS if hasattr(block, name)]
    if missing or sandwich:
        reason = f"lacks {missing}" if missing else f"has extra FFN norms {sandwich}"
        raise UnsupportedArchitectureError(
            f"{arch}: decoder block {type(block).__name__} {reason}; MemVP needs the LLaMA pre-norm block "
            f"({', '.join(_REQUIRED)})"
        )
    return layers


def _load_hf_config(cfg: LLMConfig) -> PretrainedConfig:
    """The LLM's HF config (the inline one, or config.json of ``cfg.path``); reads no weights."""
    if cfg.path is None:
        inline = dict(cfg.config)
        return AutoConfig.for_model(inline.pop("model_type"), **inline)
    gguf = gguf_location(cfg.path, cfg.gguf_file, "model.llm.path")
    if gguf is not None:
        return AutoConfig.from_pretrained(gguf[0], gguf_file=gguf[1])
    if not os.path.isdir(cfg.path):
        raise ConfigError(f"model.llm.path: '{cfg.path}' is not a directory (expected a local HF model directory "
                          "or a .gguf file)")
    if not os.path.isfile(os.path.join(cfg.path, "config.json")):
        raise ConfigError(f"model.llm.path: '{cfg.path}' has no config.json; is it an HF model directory?")
    return AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)


def num_decoder_layers(cfg: LLMConfig) -> int:
    """The LLM's number of decoder layers, from its config alone (no weights are read)."""
    return _load_hf_config(cfg).num_hidden_layers


def vocab_size(cfg: LLMConfig) -> int:
    """The LLM's embedding rows, from its config alone (no weights are read)."""
    return _load_hf_config(cfg).vocab_size


def check_vocab_fits(tokens: int, tokenizer_path: str, llm: LLMConfig) -> None:
    """Every token id of the tokenizer (``tokens`` of them) must have an embedding row in the LLM."""
    rows = vocab_size(llm)
    if tokens > rows:
        source = llm.path or "model.llm.config"
        raise ConfigError(f"data.tokenizer: {tokenizer_path} has {tokens} tokens but the LLM ({source}) has "
                          f"vocab_size {rows}: ids from {rows} on have no embedding; use the LLM's own tokenizer")


def _quantized_loading(cfg: LLMConfig, dtype: torch.dtype) -> dict:
    """from_pretrained's arguments for model.llm.quantization: bitsandbytes quantises the linear layers of the
    decoder blocks on this process's GPU as they load (the LM head stays in ``dtype``: the loss needs its
    precision)."""
    if cfg.quantization is None:
        return {}
    if not torch.cuda.is_available():
        raise ConfigError(f"model.llm.quantization={cfg.quantization}: bitsandbytes quantisation needs a CUDA device")
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


def build_meta_llm(cfg: LLMConfig) -> PreTrainedModel:
    """The LLM's architecture on the meta device, checked and frozen: every shape, no weights read, no memory
    used (the architecture check before a load, the memory plan)."""
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(_load_hf_config(cfg), trust_remote_code=cfg.trust_remote_code)
    decoder_layers(llm)
    return llm.requires_grad_(False)


def load_frozen_llm(cfg: LLMConfig) -> PreTrainedModel:
    """Load (or randomly initialise) the causal LM, check its architecture, and freeze it.

    The architecture is checked on a meta-device copy first, so a wrong model choice fails in
    milliseconds instead of after reading tens of gigabytes. Under ZeRO-3 (transformers' DeepSpeed
    integration active) models are built partitioned by zero.Init, which a meta copy cannot go through;
    there the check runs right after the partitioned load.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    hf_config = _load_hf_config(cfg)
    dtype = getattr(torch, cfg.dtype)
    common = dict(dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    if not is_deepspeed_zero3_enabled():
        build_meta_llm(cfg)
    if cfg.path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            llm = AutoModelForCausalLM.from_config(hf_config, **common)
    elif (gguf := gguf_location(cfg.path, cfg.gguf_file, "model.llm.path")) is not None:
        llm = AutoModelForCausalLM.from_pretrained(gguf[0], gguf_file=gguf[1], config=hf_config, **common)
    else:
        common.update(_quantized_loading(cfg, dtype))
        llm = AutoModelForCausalLM.from_pretrained(cfg.path, config=hf_config, use_safetensors=True, **common)
    decoder_layers(llm)
    llm.requires_grad_(False)
    return llm
