"""Loading a local HF tokenizer, and training a tiny one for debug models (no downloads)."""

from __future__ import annotations

import os
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from memvp_ds.config import ConfigError
from memvp_ds.gguf_files import gguf_location

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def tokenizer_path(cfg) -> str:
    """data.tokenizer, else the LLM directory (or its GGUF file: a GGUF file holds its tokenizer)."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    llm = cfg.model.llm
    if llm.path is None:
        raise ConfigError("data.tokenizer: needed when the LLM comes from an inline config (model.llm.config)")
    return os.path.join(llm.path, llm.gguf_file) if llm.gguf_file else llm.path


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A local HF tokenizer (a directory, or the one inside a ``.gguf`` file) with an EOS and a pad token
    (LLaMA ships no pad: fall back to unk, then eos). A BOS token is optional: sequences start with it only
    where the tokenizer has one."""
    gguf = gguf_location(path, None, "data.tokenizer")
    if gguf is not None:
        tokenizer = AutoTokenizer.from_pretrained(gguf[0], gguf_file=gguf[1])
    elif not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path} (set data.tokenizer or model.llm.path)")
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no EOS token (it ends every training answer)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 512, with_bos: bool = True,
                    add_prefix_space: bool = False) -> PreTrainedTokenizerFast:
    """Train a small GPT-2-style byte-level BPE tokenizer on ``texts`` and save it as an HF tokenizer in
    ``out_dir``. ``with_bos=False`` makes one without a BOS token (like Qwen2's); ``add_prefix_space`` makes
    the pre-tokenizer put a space before the text, as some GPT-2 variants do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = {k: v for k, v in SPECIAL_TOKENS.items() if with_bos or k != "bos_token"}
    backend = Tokenizer(models.BPE(unk_token=special["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its redraws would print blank lines into logs
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
