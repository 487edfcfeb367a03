"""KAB-APP: a k-armed bandit over the layer where DVP inserts its visual prompt (Huang et al. 2023).

Arms are candidate layers with logits a (init 0) and policy pi = softmax(a). Each training step trains
the prompt generator of one layer drawn uniformly; after every ``interval`` steps, m arms are drawn from pi
and scored on a held-out batch without gradient, reward r = 100 exp(-loss), and each drawn arm k gets
``a[k] += eta * (r_k - mean r) * pi_k (1 - pi_k)`` (pi before the update). The result is K = argmax pi.
Officially (DVP-SQA's engine.py) eta is 10 and each draw is one forward in training mode, dropout on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import torch

from memvp_ds.config import ConfigError, check_at_least, check_choice
from memvp_ds.search.base import ArchitectureSearch, HeldOutLoss, step_generator

_TRAIN_DRAW, _ARM_DRAW = 0, 1
REWARD_MODES = ("train", "eval")


@dataclass
class DVPSearchOptions:
    """KAB-APP (``search.dvp``): a k-armed bandit over DVP's insertion layer (train.mode=dvp_search)."""

    arms: int = 10
    """m: arms drawn from the policy and scored after each update interval."""
    eta: float = 10.0
    """Step size of ``a[k] += eta * (r_k - mean r) * pi_k (1 - pi_k)`` with rewards r = 100 exp(-loss)
    (official DVP-SQA: 10)."""
    reward_mode: str = "train"
    """How the held-out forwards run. ``train`` (official): training mode, dropout on, one forward per drawn
    arm (a repeated arm gets its own reward). ``eval``: dropout off, one forward per distinct arm (a repeated
    arm gets the same reward): less noisy rewards, fewer forwards."""
    interval: int = 1
    """Optimizer steps between policy updates."""

    def validate(self, cfg) -> None:
        check_at_least("search.dvp.arms", self.arms, 1)
        check_at_least("search.dvp.interval", self.interval, 1)
        check_choice("search.dvp.reward_mode", self.reward_mode, REWARD_MODES)
        if cfg.train.mode != "dvp_search":
            return
        if cfg.model.strategy != "dvp" or cfg.model.dvp.layer is not None:
            raise ConfigError("train.mode=dvp_search needs model.strategy=dvp with model.dvp.layer unset")
        if cfg.model.skip.layers:
            raise ConfigError("train.mode=dvp_search: search with all layers (model.skip.layers must be empty)")


def kab_app_update(logits: torch.Tensor, arms: Sequence[int], rewards: Sequence[float], eta: float) -> torch.Tensor:
    """One KAB-APP update of the logits (float64, returned new); ``arms`` index into ``logits``."""
    policy = torch.softmax(logits, dim=0)
    baseline = sum(rewards) / len(rewards)
    updated = logits.clone()
    for arm, reward in zip(arms, rewards):
        updated[arm] += eta * (reward - baseline) * policy[arm] * (1 - policy[arm])
    return updated


class DVPLayerSearch(ArchitectureSearch):
    name = "dvp"

    def __init__(self, strategy, cfg: DVPSearchOptions, seed: int):
        self.candidates: List[int] = strategy.candidate_layers
        super().__init__(seed, arms=len(self.candidates))
        self.strategy, self.cfg = strategy, cfg

    @property
    def policy(self) -> torch.Tensor:
        return torch.softmax(self.preferences, dim=0)

    def before_step(self, step: int) -> None:
        drawn = int(torch.randint(len(self.candidates), (1,), generator=step_generator(self.seed, step, _TRAIN_DRAW)))
        layer = self.candidates[drawn]
        self.strategy.set_active_layer(layer)
        self.check_agreement(step, layer)

    def after_step(self, step: int, heldout_loss: HeldOutLoss) -> Dict[str, float]:
        if step % self.cfg.interval:
            return {}
        arms = torch.multinomial(self.policy, self.cfg.arms, replacement=True,
                                 generator=step_generator(self.seed, step, _ARM_DRAW)).tolist()
        if self.cfg.reward_mode == "train":
            rewards = [self._reward(arm, heldout_loss, dropout=True) for arm in arms]
        else:
            # Arms are drawn with replacement; without dropout a repeated arm gets the same reward (same
            # batch), so each distinct arm costs one held-out forward.
            reward_of = {arm: self._reward(arm, heldout_loss, dropout=False) for arm in dict.fromkeys(arms)}
            rewards = [reward_of[arm] for arm in arms]
        self.preferences = kab_app_update(self.preferences, arms, rewards, self.cfg.eta)
        self.updates += 1
        self.history.append({"step": step, "arms": [self.candidates[a] for a in arms], "rewards": rewards,
                             "policy": self.policy.tolist()})
        return {f"search/pi_layer{layer}": p for layer, p in zip(self.candidates, self.policy.tolist())}

    def _reward(self, arm: int, heldout_loss: HeldOutLoss, dropout: bool) -> float:
        self.strategy.set_active_layer(self.candidates[arm])
        return 100.0 * math.exp(-heldout_loss(self.updates, dropout=dropout))

    def result(self) -> Dict[str, Any]:
        policy = self.policy
        return {"method": "dvp_search", "dvp_layer": self.candidates[int(policy.argmax())],
                "candidates": self.candidates, "policy": policy.tolist(), "logits": self.preferences.tolist(),
                "history": self.history}
