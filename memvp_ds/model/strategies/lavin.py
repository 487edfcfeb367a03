"""LaVIN (Luo et al., NeurIPS 2023) as its authors run it on ScienceQA: visual tokens in the input and a
mixture-of-modality adapter on the attention input of every decoder block.

    visual tokens    z = fc2(SiLU(fc1 f))                         (LaVIN's ``adapter_proj``, no output scale)
    every block      h = x + attn(RoutedAdapter_l(norm(x)));  out = h + mlp(post_norm(h))
    routing          w_l = softmax(router_l(m_l) / t)            per sample, two experts

m_l is the normalised state, at block l, of the *modality token*: a learned embedding (one row for samples
with an image, one for text-only samples) that officially sits at position 0 of every sequence, masked
from every other position. Since nothing attends to it and it attends only to itself, its state depends on
its own embedding alone: a one-token sequence through the same blocks. This strategy runs that one-token
pass per sample (``_route``) instead of carrying the token in the batch, which gives the official routing
exactly, keeps the text's positions and packed rows unchanged and leaves the KV cache free of it (as the
official evaluation caches the weights).

The N visual tokens go in front of the text as in ``input_prefix`` (reserved positions in packed rows);
rows without an image keep them masked. With several images per sample each image's tokens go at its tag,
and a sample with any image routes as an image sample. See docs/strategies/lavin.md for the remaining differences from
the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import List, Optional, Tuple

import torch
from torch import nn
from transformers import PreTrainedModel

from memvp_ds.config import ConfigError, ModelConfig, check_at_least
from memvp_ds.vision.routed_adapter import RoutedAdapter
from memvp_ds.model.layer_skip import MODALITY_PASS, RoutedReplacement
from memvp_ds.model.llm import decoder_layers
from memvp_ds.model.projector import VisualProjector
from memvp_ds.model.strategies.base import DecoderInputs, PackedLayout, VisualStrategy, is_multi_image
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
        # Plain lists keep frozen LLM modules out of this module's parameters.
        self._embed_tokens = [llm.get_input_embeddings()]
        self._decoder = [llm.base_model]
        # Per layer (B, 2) expert weights of the current forward, kept for decoding from the KV cache and for
        # the backward recomputation of checkpointed blocks (as MemVP keeps its memory).
        self._weights: Optional[List[torch.Tensor]] = None
        self._layout: Optional[PackedLayout] = None
        # Each block's weights in the modality pass, from its attention pre-hook to its forward hook.
        self._pass_weights: List[Optional[torch.Tensor]] = [None] * len(layers)
        for index, layer in enumerate(layers):
            layer.self_attn.register_forward_pre_hook(partial(self._adapt_attention_input, index), with_kwargs=True)
            layer.register_forward_hook(partial(self._emit_weights, index), with_kwargs=True)

    def forward(self, input_ids, attention_mask, image_features, has_image, prompt_end, layout=None) -> DecoderInputs:
        samples = layout.num_samples if layout is not None else input_ids.shape[0]
        if image_features is None:
            indicator = torch.zeros(samples, dtype=torch.long, device=input_ids.device)
        elif has_image is None:
            indicator = torch.ones(samples, dtype=torch.long, device=input_ids.device)
        else:
            indicator = (has_image.any(1) if is_multi_image(has_image) else has_image).long()
        self._layout = layout
        self._use_weights(self._route(self.modality(indicator)[:, None]))
        return prepend_visual_tokens(self._embed_tokens[0], self.projector, input_ids, attention_mask,
                                     image_features, has_image, layout)

    def _use_weights(self, weights: List[Optional[torch.Tensor]]) -> None:
        """Route with ``weights`` (per layer (B, 2), None for an unrouted DAS replacement) from now on."""
        self._weights = weights
        for layer, layer_weights in zip(self._decoder[0].layers, weights):
            if getattr(layer, "skipped", False) and isinstance(layer.adapter, RoutedReplacement):
                layer.adapter.set_routing(partial(self._per_position, layer_weights))  # LaVIN-DAS's replacement

    def decoding_rows(self) -> Tuple[torch.Tensor, ...]:
        """Each routed layer's (B, 2) expert weights: decoded tokens keep their sample's routing."""
        return tuple(w for w in self._weights or () if w is not None)

    def set_decoding_rows(self, rows: Tuple[torch.Tensor, ...]) -> None:
        if self._weights is None:
            raise RuntimeError("LaVIN decoding rows set before a prefill computed the routing")
        given = iter(rows)
        self._use_weights([next(given) if w is not None else None for w in self._weights])

    def _route(self, token: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """The modality token's pass through the decoder blocks, alone at position 0: (B, 1, d) -> each block's
        (B, 2) expert weights (a DAS-skipped block's are its LaVIN-DAS replacement's, or None for another form).

        The blocks are called whole, with a keyword their attention pre-hook and their forward hook
        recognise (also when a checkpointed block is recomputed in backward); each block then returns its
        weights next to its output. ZeRO-3 gathers a frozen block's weights when it is entered and again
        when a gradient reaches one of its outputs, so the weights must leave the block as an output, not
        through this module. No cache is passed: generation's KV cache never holds the token."""
        decoder = self._decoder[0]
        h = token.to(self._embed_tokens[0].weight.dtype)
        positions = torch.zeros(h.shape[:2], dtype=torch.long, device=h.device)
        rotary = decoder.rotary_emb(h, positions)
        weights: List[Optional[torch.Tensor]] = []
        for layer in decoder.layers:
            out = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rotary,
                        **{MODALITY_PASS: True})
            h, w = out if isinstance(out, tuple) else (out, None)  # unrouted DAS replacements return h alone
            weights.append(w)
        return weights

    def _emit_weights(self, index: int, block: nn.Module, args: tuple, kwargs: dict, output):
        if not kwargs.get(MODALITY_PASS):
            return output
        return (output[0] if isinstance(output, tuple) else output, self._pass_weights[index])

    def _adapt_attention_input(self, index: int, attention: nn.Module, args: tuple, kwargs: dict):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        adapter = self.adapters[index]
        if kwargs.get(MODALITY_PASS):
            # The official router reads token 0 of the adapter's input: here the modality token itself.
            kwargs = {k: v for k, v in kwargs.items() if k != MODALITY_PASS}
            weights = self._pass_weights[index] = adapter.route(hidden[:, 0])
            weights = weights[:, None]
        elif self._weights is None:
            raise RuntimeError("LaVIN adapters used before the strategy's forward computed the routing")
        else:
            weights = self._per_position(self._weights[index], hidden)
        adapted = adapter(hidden, weights)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": adapted}
        return (adapted, *args[1:]), kwargs

    def _per_position(self, weights: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """(B, 2) per-sample weights, broadcastable against ``hidden``: each position of a packed row takes its
        own sample's (the rows may arrive flattened into one sequence, for flash attention)."""
        if self._layout is None:
            return weights[:, None]
        return self._layout.per_position(weights).reshape(*hidden.shape[:-1], -1)

    def prefix_positions(self) -> int:
        return self.cfg.visual_tokens

    def forward_flops_per_position_and_layer(self) -> float:
        down = self.adapters[0].down
        hidden, width = down.out_features, down.in_features
        return 2.0 * width * hidden + 2 * 2.0 * width * hidden / self.adapters[0].expert_b.groups
