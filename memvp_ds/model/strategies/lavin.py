"""LaVIN (Luo et al., NeurIPS 2023) as its authors run it on ScienceQA: visual tokens in the input and a
mixture-of-modality adapter on the attention input of every decoder block.

    visual tokens    z = fc2(SiLU(fc1 f))                         (LaVIN's ``adapter_proj``, no output scale)
    every block      h = x + attn(RoutedAdapter_l(norm(x)));  out = h + mlp(post_norm(h))
    routing          w_l = softmax(router_l(m_l) / t)            per sample, two experts

m_l is the normalised state, at block l, of the *modality token*: a learned embedding (one row for samples
with an image, one for text-only samples) that officially sits at position 0 of every sequence, masked
from every other position. Since nothing attends to it and it attends only to itself, its state depends on
its own embedding alone: a one-token sequence through the same blocks, where attention over one position
is ``o_proj(v_proj(.))``. This strategy runs that one-token pass per sample (``_route``) instead of
carrying the token in the batch, which gives the official routing exactly, keeps the text's positions and
packed rows unchanged and leaves the KV cache free of it (as the official evaluation caches the weights).

The N visual tokens go in front of the text as in ``input_prefix`` (reserved positions in packed rows);
rows without an image keep them masked. See docs/strategies/lavin.md for the remaining differences from
the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import List, Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from memvp_ds.config import ConfigError, ModelConfig, check_at_least
from memvp_ds.vision.routed_adapter import RoutedAdapter
from memvp_ds.model.llm import decoder_layers
from memvp_ds.model.projector import VisualProjector
from memvp_ds.model.strategies.base import DecoderInputs, PackedLayout, VisualStrategy
from memvp_ds.model.strategies.input_prefix import prepend_visual_tokens


@dataclass
class LavinOptions:
    """Options of the ``lavin`` strategy (``model.lavin``; LaVIN's mixture-of-modality adaptation); see
    docs/strategies/lavin.md."""

    adapter_dim: int = 8
    """Hidden width of each block's routed adapter (official SQA: 8)."""
    adapter_scale: float = 1.0
    """s: factor on the adapter's expert mix (official SQA: 1)."""
    temperature: float = 10.0
    """t of the router's softmax (official SQA: 10 at 7B, 5 at 13B)."""
    dropout: float = 0.1
    """Dropout on the adapter's hidden activation (official: 0.1)."""

    def validate(self, cfg) -> None:
        check_at_least("model.lavin.adapter_dim", self.adapter_dim, 2)
        if self.adapter_dim % 2:
            raise ConfigError(f"model.lavin.adapter_dim: {self.adapter_dim} must be even (two expert groups)")
        if self.temperature <= 0:
            raise ConfigError(f"model.lavin.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lavin.dropout must be in [0, 1), got {self.dropout}")


class LavinStrategy(VisualStrategy):
    name = "lavin"
    options = LavinOptions

    def __init__(self, cfg: ModelConfig, llm: PreTrainedModel):
        super().__init__(cfg, llm)
        opts, width = cfg.lavin, llm.config.hidden_size
        layers = decoder_layers(llm)
        self.projector = VisualProjector(cfg.visual_dim, width, cfg.projector)
        # Row 0: text-only sample, row 1: sample with an image (the official img_indicators); N(0, 1) init.
        self.modality = nn.Embedding(2, width)
        self.adapters = nn.ModuleList(
            RoutedAdapter(width, opts.adapter_dim, opts.adapter_scale, opts.temperature, opts.dropout)
            for _ in layers)
        heads = llm.config.num_attention_heads
        self._kv_repeat = heads // (getattr(llm.config, "num_key_value_heads", None) or heads)
        # Plain lists keep frozen LLM modules out of this module's parameters.
        self._embed_tokens = [llm.get_input_embeddings()]
        self._layers = [llm.base_model.layers]
        # Per layer (B, 2) expert weights of the current forward, kept for decoding from the KV cache and for
        # the backward recomputation of checkpointed blocks (as MemVP keeps its memory).
        self._weights: Optional[List[torch.Tensor]] = None
        self._layout: Optional[PackedLayout] = None
        for index, layer in enumerate(layers):
            layer.self_attn.register_forward_pre_hook(partial(self._adapt_attention_input, index), with_kwargs=True)

    def forward(self, input_ids, attention_mask, image_features, has_image, prompt_end, layout=None) -> DecoderInputs:
        samples = layout.num_samples if layout is not None else input_ids.shape[0]
        if image_features is None:
            indicator = torch.zeros(samples, dtype=torch.long, device=input_ids.device)
        elif has_image is None:
            indicator = torch.ones(samples, dtype=torch.long, device=input_ids.device)
        else:
            indicator = has_image.long()
        self._layout = layout
        self._weights = self._route(self.modality(indicator)[:, None])
        return prepend_visual_tokens(self._embed_tokens[0], self.projector, input_ids, attention_mask,
                                     image_features, has_image, layout)

    def _route(self, token: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """The modality token's pass through the decoder blocks: (B, 1, d) -> each block's (B, 2) weights
        (None for a block DAS skips: it has no routed adapter)."""
        weights: List[Optional[torch.Tensor]] = []
        h = token.to(self._embed_tokens[0].weight.dtype)
        for index, layer in enumerate(self._layers[0]):
            if getattr(layer, "skipped", False):
                # A DAS-skipped block: h + adapter(norm h), for the token as for the text.
                weights.append(None)
                h = layer(h)
                continue
            layer = getattr(layer, "layer", layer)  # a computed DAS-skippable block wraps the original
            adapter = self.adapters[index]
            x = layer.input_layernorm(h)
            w = adapter.route(x[:, 0])
            weights.append(w)
            x = adapter(x, w[:, None])
            attention = layer.self_attn
            # Softmax over the token's single position is 1: attention is its value, per head, through o_proj.
            value = attention.v_proj(x).unflatten(-1, (-1, attention.head_dim))
            value = value.repeat_interleave(self._kv_repeat, dim=-2).flatten(-2)
            h = h + attention.o_proj(value)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return weights

    def _adapt_attention_input(self, index: int, attention: nn.Module, args: tuple, kwargs: dict):
        if self._weights is None:
            raise RuntimeError("LaVIN adapters used before the strategy's forward computed the routing")
        weights = self._weights[index]
        # One weight pair per sample; a packed row's positions each take their own sample's.
        weights = self._layout.per_position(weights) if self._layout is not None else weights[:, None]
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": self.adapters[index](kwargs["hidden_states"], weights)}
        return (self.adapters[index](args[0], weights), *args[1:]), kwargs

    def prefix_positions(self) -> int:
        return self.cfg.visual_tokens

    def forward_flops_per_position_and_layer(self) -> float:
        down = self.adapters[0].down
        hidden, width = down.out_features, down.in_features
        return 2.0 * width * hidden + 2 * 2.0 * width * hidden / self.adapters[0].expert_b.groups
