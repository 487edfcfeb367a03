"""LLaVA-LoRA (Liu et al. 2023, LLaVA's LoRA recipe), the input-space baseline of MemVP's ScienceQA table:
the projected visual tokens in front of the text (``input_prefix``) and LoRA on every Linear of the frozen LLM
(``model.lora``, peft). The projector and the LoRA tensors train; docs/strategies/llava_lora.md."""

from __future__ import annotations

from memvp_ds.model.strategies.input_prefix import InputPrefixStrategy


class LLaVALoRAStrategy(InputPrefixStrategy):
    """``input_prefix``'s visual tokens; ``build_model`` adds LoRA (``has_lora``)."""

    name = "llava_lora"
    has_lora = True
