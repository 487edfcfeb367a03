"""Loading a local HF tokenizer, and training a tiny one for debug models (no downloads)."""

from __future__ import annotations

import os
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A local HF tokenizer with a pad token (LLaMA ships none: fall back to unk, then eos)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path} (set data.tokenizer or model.llm.path)")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} needs both a BOS and an EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer on ``texts`` and save it as an HF tokenizer in ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its redraws would print blank lines into logs
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
