"""Input-space baseline (LLaVA / LaVIN style): projected visual tokens prepended to the token embeddings."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from memvp_ds.config import ModelConfig
from memvp_ds.model.projector import VisualProjector
from memvp_ds.model.strategies.base import DecoderInputs, VisualStrategy, image_indicator, place_visual_tokens


class InputPrefixStrategy(VisualStrategy):
    """The N projected visual tokens go in front of the text, so the sequence grows by N.

    Rows without an image keep the N prefix slots (the batch must stay rectangular) but with attention mask
    0, so their text sees exactly what the frozen LLM alone would see; positions are counted over unmasked
    tokens, so text positions start after the visual tokens only where there is an image.

    In a packed batch the data layer reserves N positions in front of each image sample's text (and none
    for a text-only sample); the visual tokens go there, seen by that sample's text alone.
    """

    name = "input_prefix"
    packs_exactly = True

    def __init__(self, cfg: ModelConfig, llm: PreTrainedModel):
        super().__init__(cfg, llm)
        self.projector = VisualProjector(cfg.visual_dim, llm.config.hidden_size, cfg.projector)
        # A plain list keeps the frozen embedding out of this module's parameters (it belongs to the LLM).
        self._embed_tokens = [llm.get_input_embeddings()]

    def visual_positions_per_image(self) -> int:
        return self.cfg.visual_tokens

    def forward(self, input_ids, attention_mask, image_features, has_image, prompt_end, layout=None) -> DecoderInputs:
        if image_features is None:
            return DecoderInputs(attention_mask=attention_mask, input_ids=input_ids)
        text_embeds = self._embed_tokens[0](input_ids)
        visual = self.projector(image_features).to(text_embeds.dtype)
        if layout is not None:
            embeds = place_visual_tokens(layout, text_embeds, visual, has_image)
            return DecoderInputs(attention_mask=attention_mask, inputs_embeds=embeds)
        visual_mask = image_indicator(image_features, has_image).view(-1, 1).to(attention_mask.dtype)
        visual_mask = visual_mask.expand(-1, visual.shape[1])
        return DecoderInputs(
            attention_mask=torch.cat([visual_mask, attention_mask], dim=1),
            inputs_embeds=torch.cat([visual, text_embeds], dim=1),
            prefix_len=visual.shape[1],
        )
