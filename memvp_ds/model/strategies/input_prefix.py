"""Input-space baseline (LLaVA / LaVIN style): projected visual tokens prepended to the token embeddings."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from memvp_ds.config import ModelConfig
from memvp_ds.model.projector import VisualProjector
from memvp_ds.model.strategies.base import (DecoderInputs, VisualStrategy, image_indicator, is_multi_image,
                                            place_in_text, place_visual_tokens)


def prepend_visual_tokens(embed_tokens: nn.Module, projector: VisualProjector, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, image_features: Optional[torch.Tensor],
                          has_image: Optional[torch.Tensor], layout=None) -> DecoderInputs:
    """The N projected visual tokens in front of the text (the sequence grows by N).

    Rows without an image keep the N prefix slots (the batch must stay rectangular) but with attention mask
    0, so their text sees exactly what the frozen LLM alone would see; positions are counted over unmasked
    tokens, so text positions start after the visual tokens only where there is an image. A batch without
    features is the text alone.

    In a packed batch (``layout``) the data layer reserves N positions in front of each image sample's text
    (and none for a text-only sample); the visual tokens go there, seen by that sample's text alone. In a
    multi-image batch (``has_image`` (B, k)) each image's N tokens go where the data layer put them in the
    text, at the image's tag (``place_in_text``), padded or packed alike.
    """
    if image_features is None:
        return DecoderInputs(attention_mask=attention_mask, input_ids=input_ids)
    text_embeds = embed_tokens(input_ids.clamp(min=0))  # negative ids mark visual positions (multi-image)
    visual = projector(image_features).to(text_embeds.dtype)
    if is_multi_image(has_image):
        return DecoderInputs(attention_mask=attention_mask,
                             inputs_embeds=place_in_text(input_ids, text_embeds, visual, has_image, layout))
    if layout is not None:
        return DecoderInputs(attention_mask=attention_mask,
                             inputs_embeds=place_visual_tokens(layout, text_embeds, visual, has_image))
    visual_mask = image_indicator(image_features, has_image).view(-1, 1).to(attention_mask.dtype)
    visual_mask = visual_mask.expand(-1, visual.shape[1])
    return DecoderInputs(
        attention_mask=torch.cat([visual_mask, attention_mask], dim=1),
        inputs_embeds=torch.cat([visual, text_embeds], dim=1),
        prefix_len=visual.shape[1],
    )


class InputPrefixStrategy(VisualStrategy):
    """The N projected visual tokens go in front of the text (``prepend_visual_tokens``)."""

    name = "input_prefix"

    def __init__(self, cfg: ModelConfig, llm: PreTrainedModel):
        super().__init__(cfg, llm)
        self.projector = VisualProjector(cfg.visual_dim, llm.config.hidden_size, cfg.projector)
        # A plain list keeps the frozen embedding out of this module's parameters (it belongs to the LLM).
        self._embed_tokens = [llm.get_input_embeddings()]

    def forward(self, input_ids, attention_mask, image_features, has_image, prompt_end, layout=None) -> DecoderInputs:
        return prepend_visual_tokens(self._embed_tokens[0], self.projector, input_ids, attention_mask,
                                     image_features, has_image, layout)

    def prefix_positions(self) -> int:
        return self.cfg.visual_tokens
