"""The interface every visual-prompting strategy implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from memvp_ds.config import ModelConfig


@dataclass
class DecoderInputs:
    """What the strategy hands to the LLM's decoder stack for one forward (or one generation prefill).

    Exactly one of ``input_ids`` / ``inputs_embeds`` is set. ``prefix_len`` positions at the front are
    not text (e.g. visual tokens) and are dropped before the LM head.
    """

    attention_mask: torch.Tensor
    input_ids: Optional[torch.Tensor] = None
    inputs_embeds: Optional[torch.Tensor] = None
    prefix_len: int = 0


def image_indicator(image_features: torch.Tensor, has_image: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, 1, 1) float mask, 0 for rows without an image; ``has_image=None`` means every row has one."""
    if has_image is None:
        return image_features.new_ones(image_features.shape[0], 1, 1)
    return has_image.to(image_features.dtype).view(-1, 1, 1)


def project_visual(projector: nn.Module, image_features: Optional[torch.Tensor], has_image: Optional[torch.Tensor],
                   batch_size: int, tokens_without_features: int) -> torch.Tensor:
    """(B, N, d) projected visual tokens, zero for rows without an image. With no features at all (a text-only
    batch), ``tokens_without_features`` zero rows, so the strategy's shapes stay the same."""
    if image_features is None:
        weight = projector.fc2.weight
        return weight.new_zeros(batch_size, tokens_without_features, weight.shape[0])
    return projector(image_features) * image_indicator(image_features, has_image)


class VisualStrategy(nn.Module):
    """One way of feeding projected visual features to a frozen decoder-only LLM.

    A strategy owns all of its trainable tensors and uses them only inside its own ``forward`` (or in hooks
    it registers on LLM submodules with tensors computed in that ``forward``): under ZeRO-3 a parameter is
    gathered only while the module that owns it runs. ``forward`` is called once per model forward and once
    per ``generate`` call; anything per-image is computed there, never per layer or per decoded token.
    Submodules called from such hooks are fine too: ZeRO-3 gathers a module's parameters around its own call.
    """

    name: ClassVar[str]
    options: ClassVar[Optional[type]] = None
    """The strategy's options dataclass, added to the config as ``model.<name>`` (None: no options)."""

    def __init__(self, cfg: ModelConfig, llm: PreTrainedModel):
        super().__init__()
        self.cfg = cfg

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: Optional[torch.Tensor],
        has_image: Optional[torch.Tensor],
        prompt_end: torch.Tensor,
    ) -> DecoderInputs:
        """``prompt_end`` (B,) is the index of each row's last prompt token: the answer starts after it."""
        raise NotImplementedError

    def prefill_finished(self) -> None:
        """``generate`` calls this after the prompt pass, before decoding from the KV cache. Strategies whose
        term applies to prompt positions only (DVP) stop applying it; the others keep theirs."""

    def prefix_positions(self) -> int:
        """Positions the strategy puts in front of the text of a batch with image features (speed and FLOPs
        accounting: they are computed in every layer like text tokens)."""
        return 0

    def forward_flops_per_position_and_layer(self) -> float:
        """Forward FLOPs the strategy adds per position in each computed decoder layer (MFU accounting)."""
        return 0.0
