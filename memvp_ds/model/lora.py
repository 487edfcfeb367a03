"""LoRA on the frozen LLM (Hu et al. 2022) through the peft library, orthogonal to the strategy.

Each targeted Linear ``W`` becomes ``W x + (alpha / rank) * B A Dropout(x)`` with ``A`` (rank x in, Kaiming
uniform) and ``B`` (out x rank, zeros): at initialisation the LLM computes exactly what it did. peft's
``inject_adapter_in_model`` swaps the Linears in place, so the LLM stays the HF model every other part of the
code walks (decoder layers, hooks, cache); the LoRA tensors are its only parameters with ``requires_grad``,
so the one trainable predicate (``model/vlm.py: is_trainable``) gives them to the optimizer, the checkpoints
and the export under their names in the model (``llm.model.layers.0.self_attn.q_proj.lora_A.default.weight``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from transformers import PreTrainedModel

from memvp_ds.config import ConfigError, check_at_least
from memvp_ds.model.strategies import STRATEGIES

ALL_LINEAR = "all-linear"


@dataclass
class LoRAOptions:
    """LoRA on the frozen LLM (``model.lora``) through peft: low-rank trainable updates of its Linears.
    Off for every strategy unless enabled; strategy llava_lora (LLaVA's LoRA baseline) always has it. The
    defaults are LLaVA's LoRA recipe (scripts/v1_5/finetune_lora.sh: rank 128, alpha 256, dropout 0.05, every
    Linear of the LLM)."""

    enabled: Optional[bool] = None
    """Put LoRA on the LLM. None: on for strategies that are defined with it (llava_lora), off for the others;
    true adds it to any strategy (e.g. MemVP + LoRA); false with llava_lora is an error."""
    rank: int = 128
    """r: the rank of each update B A (LLaVA: 128)."""
    alpha: float = 256.0
    """The update is scaled by alpha / rank (LLaVA: 256, so x2)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch's input during training (LLaVA: 0.05)."""
    target_modules: List[str] = field(default_factory=lambda: [ALL_LINEAR])
    """Which Linears of the LLM get LoRA: 'all-linear' (every Linear of the decoder blocks, never the LM head;
    LLaVA's find_all_linear_names) or module names matched as name suffixes, e.g. [q_proj, v_proj]."""

    def validate(self, cfg) -> None:
        check_at_least("model.lora.rank", self.rank, 1)
        if not self.alpha > 0:
            raise ConfigError(f"model.lora.alpha: {self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout: {self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules: name at least one module (or 'all-linear')")
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ConfigError(f"model.lora.target_modules: {list(self.target_modules)}: 'all-linear' stands alone")
        strategy = STRATEGIES.get(cfg.model.strategy)
        if self.enabled is False and strategy is not None and strategy.has_lora:
            raise ConfigError(f"model.lora.enabled: strategy {strategy.name} is defined with LoRA; it cannot run "
                              "with model.lora.enabled=false (input_prefix is llava_lora without LoRA)")

    def active(self, strategy_has_lora: bool) -> bool:
        """Whether LoRA goes on the LLM, given whether the strategy is defined with it."""
        return strategy_has_lora if self.enabled is None else self.enabled


def install_lora(llm: PreTrainedModel, options: LoRAOptions) -> None:
    """Replace the targeted Linears of ``llm`` by peft LoRA layers in place.

    Call after the strategy has hooked into the blocks (its hooks sit on attention, FFN or block modules,
    which stay in place) and before layer skipping, whose adapters must not be taken for LLM Linears (peft
    also freezes every other parameter of the model it is given).
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = ALL_LINEAR if list(options.target_modules) == [ALL_LINEAR] else list(options.target_modules)
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=targets, bias="none")
    try:
        inject_adapter_in_model(config, llm)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"model.lora.target_modules: {err}") from None
