"""DAS: search for the decoder layers to skip (Wu et al., NeurIPS 2023).

Each candidate layer i has a score s_i (init 0) and skip probability p_i = sigmoid(s_i). Every training
step skips k layers drawn without replacement in proportion to p, and the adapters standing in for them
train. Every ``turn`` steps after the warm-up (default half of the run, as in the official LaVIN-DAS), several distinct skip sets S_j are scored on a held-out batch
without gradient, r_j = exp(-loss_j), and ``s_i += eta * (r_j - mean r) * p_i (1 - p_i)`` for i in S_j (p
before the update). The result is the top-k layers by p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from memvp_ds.config import ConfigError, check_at_least
from memvp_ds.model.layer_skip import LayerSkipping
from memvp_ds.search.base import ArchitectureSearch, HeldOutLoss, step_generator

_TRAIN_DRAW, _SUBSET_DRAW = 2, 3
_MAX_DRAWS_PER_SUBSET = 20


@dataclass
class DASSearchOptions:
    """Search for the layers to skip (``search.das``, train.mode=das_search)."""

    skip: int = 1
    """k: layers skipped by every sampled sub-network and in the final skip list."""
    subsets: int = 4
    """Distinct skip sets scored per update."""
    eta: float = 10.0
    """Step size of ``s_i += eta * (r_j - mean r) * p_i (1 - p_i)`` with rewards r = exp(-loss)."""
    turn: int = 5
    """Optimizer steps between score updates."""
    warmup_steps: Optional[int] = None
    """Steps before the first score update, while the sampled sub-networks and their adapters train.
    Unset: half of the run's steps (official LaVIN-DAS: 5 of its 10 search epochs)."""
    ramp: bool = False
    """Grow the number of skipped layers from 1 to ``skip`` over the warm-up."""
    candidates: Optional[List[int]] = None
    """Layers that may be skipped (default: all)."""

    def validate(self, cfg) -> None:
        for key in ("skip", "subsets", "turn"):
            check_at_least(f"search.das.{key}", getattr(self, key), 1)
        if self.warmup_steps is not None:
            check_at_least("search.das.warmup_steps", self.warmup_steps, 0)
        if cfg.train.mode != "das_search":
            return
        if cfg.model.skip.layers:
            raise ConfigError("train.mode=das_search chooses the skipped layers: model.skip.layers must be empty")
        if cfg.model.strategy == "dvp" and cfg.model.dvp.layer is None:
            raise ConfigError("train.mode=das_search with model.strategy=dvp needs a fixed model.dvp.layer")


def das_score_update(scores: torch.Tensor, subsets: Sequence[Sequence[int]], rewards: Sequence[float],
                     eta: float) -> torch.Tensor:
    """One DAS score update (float64, returned new); ``subsets`` hold indices into ``scores``."""
    p = torch.sigmoid(scores)
    baseline = sum(rewards) / len(rewards)
    updated = scores.clone()
    for subset, reward in zip(subsets, rewards):
        for i in subset:
            updated[i] += eta * (reward - baseline) * p[i] * (1 - p[i])
    return updated


def sample_skip_set(probabilities: torch.Tensor, k: int, generator: torch.Generator) -> List[int]:
    """k distinct indices drawn without replacement, each draw proportional to the remaining p."""
    return sorted(torch.multinomial(probabilities, k, replacement=False, generator=generator).tolist())


class LayerSkipSearch(ArchitectureSearch):
    name = "das"

    def __init__(self, skipping: LayerSkipping, cfg: DASSearchOptions, seed: int, total_steps: int):
        self.candidates: List[int] = list(skipping.wrapped)
        super().__init__(seed, arms=len(self.candidates))
        self.skipping, self.cfg = skipping, cfg
        self.warmup_steps = total_steps // 2 if cfg.warmup_steps is None else cfg.warmup_steps
        if not 1 <= cfg.skip < len(skipping.layers) or cfg.skip > len(self.candidates):
            raise ValueError(f"search.das.skip = {cfg.skip}: needs 1 <= k <= {len(self.candidates)} candidates "
                             f"and fewer than the {len(skipping.layers)} layers")

    @property
    def probabilities(self) -> torch.Tensor:
        return torch.sigmoid(self.preferences)

    def skip_count(self, step: int) -> int:
        """k, or with ``ramp`` 1 rising linearly to k over the warm-up."""
        if not self.cfg.ramp or step >= self.warmup_steps:
            return self.cfg.skip
        return 1 + (self.cfg.skip - 1) * step // max(self.warmup_steps, 1)

    def _layers(self, indices: Sequence[int]) -> List[int]:
        return [self.candidates[i] for i in indices]

    def before_step(self, step: int) -> None:
        drawn = sample_skip_set(self.probabilities, self.skip_count(step), step_generator(self.seed, step, _TRAIN_DRAW))
        layers = self._layers(drawn)
        self.skipping.set_skipped(layers)
        self.check_agreement(step, self.skipping.skipped)

    def after_step(self, step: int, heldout_loss: HeldOutLoss) -> Dict[str, float]:
        if step <= self.warmup_steps or step % self.cfg.turn:
            return {}
        generator = step_generator(self.seed, step, _SUBSET_DRAW)
        subsets: List[List[int]] = []
        for _ in range(self.cfg.subsets * _MAX_DRAWS_PER_SUBSET):  # fewer if there are not enough distinct sets
            subset = sample_skip_set(self.probabilities, self.cfg.skip, generator)
            if subset not in subsets:
                subsets.append(subset)
            if len(subsets) == self.cfg.subsets:
                break
        rewards = []
        for subset in subsets:
            self.skipping.set_skipped(self._layers(subset))
            rewards.append(math.exp(-heldout_loss(self.updates)))
        self.preferences = das_score_update(self.preferences, subsets, rewards, self.cfg.eta)
        self.updates += 1
        self.history.append({"step": step, "subsets": [self._layers(s) for s in subsets], "rewards": rewards,
                             "probabilities": self.probabilities.tolist()})
        return {f"search/p_skip_layer{layer}": p for layer, p in zip(self.candidates, self.probabilities.tolist())}

    def skip_layers(self) -> List[int]:
        top = torch.topk(self.probabilities, self.cfg.skip).indices.tolist()
        return sorted(self._layers(top))

    def result(self) -> Dict[str, Any]:
        return {"method": "das_search", "skip_layers": self.skip_layers(), "candidates": self.candidates,
                "probabilities": self.probabilities.tolist(), "scores": self.preferences.tolist(),
                "history": self.history}
