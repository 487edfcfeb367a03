"""Registry of visual-prompting strategies: adding a method is one file plus one line here."""

from memvp_ds.model.strategies.apt import APTStrategy
from memvp_ds.model.strategies.base import DecoderInputs, VisualStrategy
from memvp_ds.model.strategies.dvp import DVPStrategy
from memvp_ds.model.strategies.input_prefix import InputPrefixStrategy
from memvp_ds.model.strategies.lavin import LavinStrategy
from memvp_ds.model.strategies.llava_lora import LLaVALoRAStrategy
from memvp_ds.model.strategies.memvp import MemVPStrategy

STRATEGIES = {cls.name: cls for cls in (MemVPStrategy, InputPrefixStrategy, APTStrategy, DVPStrategy, LavinStrategy,
                                        LLaVALoRAStrategy)}

__all__ = ["STRATEGIES", "DecoderInputs", "VisualStrategy"]
