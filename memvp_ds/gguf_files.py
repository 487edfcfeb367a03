"""GGUF model files (llama.cpp's format): telling a GGUF path apart from an HF directory, and the package
check. Shared by the LLM loader (model) and the tokenizer loader (data), which do not import each other.

transformers reads a GGUF file through ``from_pretrained(directory, gguf_file=name)`` and dequantises every
tensor (Q4/Q8/F16 ...) to the requested dtype: the model that trains is an ordinary HF model."""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

from memvp_ds.config import ConfigError

SUFFIX = ".gguf"


def is_gguf_file(path: Optional[str]) -> bool:
    return path is not None and path.lower().endswith(SUFFIX)


def gguf_location(path: str, gguf_file: Optional[str], option: str) -> Optional[Tuple[str, str]]:
    """(directory, file name) when ``path`` (or ``path`` + ``gguf_file``) names a GGUF file, else None (an
    HF directory). Checks that the file exists and that the ``gguf`` package is installed, naming ``option``."""
    if gguf_file is None and not is_gguf_file(path):
        return None
    full = os.path.join(path, gguf_file) if gguf_file is not None else path
    if not os.path.isfile(full):
        raise ConfigError(f"{option}: GGUF file not found: {full}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{option}: {full} is a GGUF file; reading it needs the 'gguf' package (pip install gguf)")
    return os.path.dirname(os.path.abspath(full)), os.path.basename(full)
