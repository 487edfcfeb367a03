"""memvp_ds: memory-space visual prompting (MemVP) fine-tuning of frozen LLMs with DeepSpeed."""

from memvp_ds.config import Config, ConfigError, load_config
from memvp_ds.model import VisualPromptedLM, build_model

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "VisualPromptedLM", "build_model", "load_config", "__version__"]
