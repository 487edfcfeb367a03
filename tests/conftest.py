"""Shared fixtures: tiny random models built from the shipped tiny configs, a tokenizer trained here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from memvp_ds import build_model, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def tiny_config(strategy: str = "memvp", *overrides: str):
    return load_config(str(CONFIGS / f"tiny_{strategy}.yaml"), list(overrides))


def tiny_model(strategy: str = "memvp", *overrides: str):
    torch.manual_seed(0)
    return build_model(tiny_config(strategy, *overrides).model)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    from memvp_ds.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    texts = [
        f"Question: What colour is the {shape} at the {pos}?\nContext: N/A\nOptions: (A) red (B) blue\n"
        f"Answer: The answer is {letter}."
        for shape in ("circle", "square", "triangle")
        for pos in ("left", "right", "top", "bottom")
        for letter in "ABCD"
    ]
    train_tokenizer(texts * 4, str(out), vocab_size=300)
    return str(out)


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    # Two cores here; keeping torch to what the machine has avoids oversubscription when ranks run beside.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
