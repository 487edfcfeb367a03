"""Dynamic architecture skipping (DAS): decoder layers that are not computed, each replaced by an adapter.

A skipped layer becomes ``h + A(input_layernorm(h))``, A in one of the authors' forms (``model.skip.adapter``):
LLaVA-DAS ``A(n) = n + up(ReLU(down n))`` (Xavier, zero biases), LaVIN-DAS A = LaVIN's routed adapter
without its residual (routed by the modality token), or this project's earlier bottleneck (zero ``up``). Its attention and FFN
never run, so it costs no FLOPs and holds no KV cache: the computed layers are renumbered for the cache so
that cache slot 0 (from which transformers reads the sequence length) always belongs to a computed layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Iterable, List, Optional, Tuple

import torch
from torch import nn
from transformers import PreTrainedModel

from memvp_ds.config import ConfigError, check_at_least, check_choice
from memvp_ds.model.adapters import BottleneckAdapter
from memvp_ds.vision.routed_adapter import RoutedAdapter

SKIP_ADAPTERS = ("auto", "llava", "lavin", "bottleneck")
DEFAULT_DIMS = {"llava": 256, "lavin": 32, "bottleneck": 256}
"""Official replacement widths: LLaVA-DAS --dim_replace 256, LaVIN-DAS 4 x adapter_dim = 32."""
MODALITY_PASS = "lavin_modality_pass"
"""Keyword the lavin strategy's modality-token pass gives every block (memvp_ds/model/strategies/lavin.py)."""


@dataclass
class SkipOptions:
    """Dynamic architecture skipping (``model.skip``; DAS, Wu et al. 2023): decoder layers replaced by light
    adapters."""

    layers: List[int] = field(default_factory=list)
    """Decoder layers (0-based) that are not computed; each becomes ``h + adapter(input_layernorm(h))``."""
    from_search: Optional[str] = None
    """Output directory of a ``train.mode=das_search`` run: fills ``layers`` from its search.json when empty."""
    adapter: str = "auto"
    """What replaces a skipped layer: llava (LLaVA-DAS: h + n + up(ReLU(down n)), n = input_layernorm(h)),
    lavin (LaVIN-DAS: h + routed adapter mix of n, routed by the modality token; needs a LaVIN base),
    bottleneck (this project's earlier h + up(SiLU(down n)), zero up) or auto: lavin on a LaVIN base
    (strategy lavin, or dvp with base lavin), llava otherwise."""
    adapter_dim: Optional[int] = None
    """Hidden width of each replacement adapter (default: the official 256 for llava and bottleneck, 32 for
    lavin)."""

    def validate(self, cfg) -> None:
        check_choice("model.skip.adapter", self.adapter, SKIP_ADAPTERS)
        if self.adapter_dim is not None:
            check_at_least("model.skip.adapter_dim", self.adapter_dim, 1)
        if self.adapter == "lavin" and not on_lavin(cfg.model):
            raise ConfigError("model.skip.adapter: lavin is routed by LaVIN's modality token; it needs "
                              "model.strategy=lavin or model.dvp.base=lavin")
        if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
            raise ConfigError(f"model.skip.layers: {self.layers} must be distinct non-negative layer indices")


def on_lavin(model_cfg) -> bool:
    return model_cfg.strategy == "lavin" or (model_cfg.strategy == "dvp" and model_cfg.dvp.base == "lavin")


def adapter_form(model_cfg) -> Tuple[str, int]:
    """(form, hidden width) of the replacement adapters, ``auto`` and the default width resolved."""
    options = model_cfg.skip
    form = options.adapter if options.adapter != "auto" else ("lavin" if on_lavin(model_cfg) else "llava")
    return form, options.adapter_dim or DEFAULT_DIMS[form]


class LlavaReplacement(nn.Module):
    """LLaVA-DAS's ``n + up(ReLU(down n))`` (its Adapter, residual to its own input), Xavier weights, zero
    biases; the skipped layer adds it to h."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.down, self.up = nn.Linear(width, hidden), nn.Linear(hidden, width)
        for layer in (self.down, self.up):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        x = n.to(self.down.weight.dtype)
        return (x + self.up(torch.relu(self.down(x)))).to(n.dtype)


class RoutedReplacement(nn.Module):
    """LaVIN-DAS: the routed adapter's expert mix without its residual (``res=False``), hidden 4 x LaVIN's,
    routed like LaVIN's blocks: by the modality token's state at this layer. The lavin strategy's modality
    pass computes the weights here (``modality_pass``) and hands each sample's weights back through
    ``set_routing`` before the text's pass."""

    def __init__(self, width: int, hidden: int, scale: float, temperature: float, dropout: float):
        super().__init__()
        self.adapter = RoutedAdapter(width, hidden, scale, temperature, dropout)
        self._routing = None

    def set_routing(self, per_position) -> None:
        """``per_position(hidden)`` -> the weights broadcastable against that hidden state."""
        self._routing = per_position

    def modality_pass(self, n: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        weights = self.adapter.route(n[:, 0])
        return self.adapter(n, weights[:, None], residual=False), weights

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        if self._routing is None:
            raise RuntimeError("LaVIN-DAS replacement used before the lavin strategy computed its routing")
        return self.adapter(n, self._routing(n), residual=False)


class SkippableLayer(nn.Module):
    """A decoder layer that is computed as usual, or skipped: ``h + adapter(norm(h))``.

    ``layer`` is None for a permanently skipped layer (the final DAS model): its weights are dropped.
    """

    def __init__(self, layer: Optional[nn.Module], norm: nn.Module, adapter: nn.Module):
        super().__init__()
        self.layer = layer
        self.norm = norm
        self.adapter = adapter
        self.skipped = layer is None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.skipped:
            if kwargs.get(MODALITY_PASS) and isinstance(self.adapter, RoutedReplacement):
                # LaVIN's modality token: its own routing, returned next to the output (as computed blocks do).
                mixed, weights = self.adapter.modality_pass(self.norm(hidden_states))
                return hidden_states + mixed, weights
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
                           model_cfg) -> Optional[LayerSkipping]:
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
        adapter = _replacement(model_cfg, width).to(original.input_layernorm.weight.device)
        layers[i] = SkippableLayer(None if i in skip else original, original.input_layernorm, adapter)
    skipping = LayerSkipping(llm, sorted(set(skip) | set(searchable)))
    skipping.set_skipped(skip)
    return skipping


def _replacement(model_cfg, width: int) -> nn.Module:
    form, hidden = adapter_form(model_cfg)
    if form == "llava":
        return LlavaReplacement(width, hidden)
    if form == "lavin":
        lavin = model_cfg.lavin
        return RoutedReplacement(width, hidden, lavin.adapter_scale, lavin.temperature, lavin.dropout)
    return BottleneckAdapter(width, hidden)
