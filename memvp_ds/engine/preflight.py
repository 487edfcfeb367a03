"""Checks that run before anything heavy (model load, engine, data workers): each fails with one line naming
the option or file, instead of a crash minutes or hours into a job."""

from __future__ import annotations

import os
import tempfile

from memvp_ds.config import ConfigError, LLMConfig
from memvp_ds.model.llm import vocab_size


def check_writable(directory: str, key: str) -> None:
    """Create ``directory`` if needed and prove a file can be written there (``key`` names the option)."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"{key}: cannot write to {directory}: {err.strerror or err}") from None


def check_vocab_fits(tokens: int, tokenizer_path: str, llm: LLMConfig) -> None:
    """Every token id of the tokenizer (``tokens`` of them) must have an embedding row in the LLM."""
    rows = vocab_size(llm)
    if tokens > rows:
        source = llm.path or "model.llm.config"
        raise ConfigError(f"data.tokenizer: {tokenizer_path} has {tokens} tokens but the LLM ({source}) has "
                          f"vocab_size {rows}: ids from {rows} on have no embedding; use the LLM's own tokenizer")
