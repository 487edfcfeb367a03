"""Dynamic architecture skipping (DAS): decoder layers that are not computed, each replaced by an adapter.

A skipped layer becomes ``h + A(input_layernorm(h))`` with A a bottleneck adapter. Its attention and FFN
never run, so it costs no FLOPs and holds no KV cache: the computed layers are renumbered for the cache so
that cache slot 0 (from which transformers reads the sequence length) always belongs to a computed layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Iterable, List, Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from memvp_ds.config import ConfigError, check_at_least
from memvp_ds.model.adapters import BottleneckAdapter


@dataclass
class SkipOptions:
    """Dynamic architecture skipping (``model.skip``; DAS, Wu et al. 2023): decoder layers replaced by light
    adapters."""

    layers: List[int] = field(default_factory=list)
    """Decoder layers (0-based) that are not computed; each becomes ``h + adapter(input_layernorm(h))``."""
    from_search: Optional[str] = None
    """Output directory of a ``train.mode=das_search`` run: fills ``layers`` from its search.json when empty."""
    adapter_dim: int = 256
    """Hidden width of each skipped layer's bottleneck adapter."""

    def validate(self, cfg) -> None:
        check_at_least("model.skip.adapter_dim", self.adapter_dim, 1)
        if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
            raise ConfigError(f"model.skip.layers: {self.layers} must be distinct non-negative layer indices")


class SkippableLayer(nn.Module):
    """A decoder layer that is computed as usual, or skipped: ``h + adapter(norm(h))``.

    ``layer`` is None for a permanently skipped layer (the final DAS model): its weights are dropped.
    """

    def __init__(self, layer: Optional[nn.Module], norm: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.layer = layer
        self.norm = norm
        self.adapter = adapter
        self.skipped = layer is None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.skipped:
            return hidden_states + self.adapter(self.norm(hidden_states))
        return self.layer(hidden_states, *args, **kwargs)


class LayerSkipping:
    """The skippable layers of one LLM, and which of them are skipped right now."""

    def __init__(self, llm: PreTrainedModel, wrapped: List[int]):
        self.layers = llm.base_model.layers
        self.wrapped = wrapped

    @property
    def skipped(self) -> List[int]:
        return [i for i in self.wrapped if self.layers[i].skipped]

    @property
    def computed_layers(self) -> int:
        return len(self.layers) - len(self.skipped)

    def set_skipped(self, skipped: Collection[int]) -> None:
        """Skip exactly ``skipped`` among the wrapped layers (a search calls this before every step)."""
        unknown = set(skipped) - set(self.wrapped)
        if unknown:
            raise ValueError(f"layers {sorted(unknown)} cannot be skipped; skippable: {self.wrapped}")
        if len(skipped) >= len(self.layers):
            raise ValueError("at least one decoder layer must be computed")
        for i in self.wrapped:
            layer = self.layers[i]
            if layer.layer is None and i not in skipped:
                raise ValueError(f"layer {i} was removed from this model and cannot be computed")
            layer.skipped = i in skipped
        cache_slot = 0
        for layer in self.layers:
            if isinstance(layer, SkippableLayer):
                if layer.skipped:
                    continue
                layer = layer.layer
            layer.self_attn.layer_idx = cache_slot
            cache_slot += 1


def install_layer_skipping(llm: PreTrainedModel, skip: Iterable[int], searchable: Iterable[int],
                           adapter_dim: int) -> Optional[LayerSkipping]:
    """Wrap the layers in ``skip`` (dropped for good) and ``searchable`` (kept, toggled by a DAS search).

    Call after the strategy has hooked into the layers: hooks stay on the wrapped originals, so a computed
    layer keeps its strategy term and a skipped one has none.
    """
    skip, searchable = sorted(set(skip)), sorted(set(searchable))
    if not skip and not searchable:
        return None
    layers = llm.base_model.layers
    out_of_range = [i for i in skip + searchable if not 0 <= i < len(layers)]
    if out_of_range:
        raise ConfigError(f"model.skip.layers / search.das.candidates: layers {out_of_range} out of range for "
                          f"a {len(layers)}-layer model")
    width = llm.config.hidden_size
    for i in sorted(set(skip) | set(searchable)):
        original = layers[i]
        adapter = BottleneckAdapter(width, adapter_dim).to(original.input_layernorm.weight.device)
        layers[i] = SkippableLayer(None if i in skip else original, original.input_layernorm, adapter)
    skipping = LayerSkipping(llm, sorted(set(skip) | set(searchable)))
    skipping.set_skipped(skip)
    return skipping
