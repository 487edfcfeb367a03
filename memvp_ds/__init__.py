"""memvp_ds: memory-space visual prompting (MemVP) fine-tuning of frozen LLMs with DeepSpeed.

The top-level names load lazily, so importing a light submodule (say ``memvp_ds.data.prompts`` from
data_prep) does not pull in torch, transformers and every strategy.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {
    "Config": "memvp_ds.config",
    "ConfigError": "memvp_ds.config",
    "load_config": "memvp_ds.schema",
    "VisualPromptedLM": "memvp_ds.model",
    "build_model": "memvp_ds.model",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memvp_ds' has no attribute {name!r}")
