"""What every architecture search shares: the trainer's hooks, per-step randomness, rank agreement."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Dict, List

import torch

from memvp_ds.distributed import all_gather_objects

HeldOutLoss = Callable[..., float]
"""``heldout_loss(update_index, dropout=False)``: mean loss over all ranks on held-out batch
``heldout_batch_index(update_index, ...)``, without gradient; with ``dropout`` the model stays in training mode
(dropout on, a fresh draw per call), else it is scored in eval mode."""

_HELDOUT_STREAM = 15


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): every rank draws the same numbers without any
    communication, and a resumed run draws exactly what the uninterrupted one would have."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 16 + stream)


def heldout_batch_index(update: int, batches: int, seed: int) -> int:
    """Which of a rank's ``batches`` held-out batches scores policy update ``update``.

    The updates rotate over all of them, each pass in its own order drawn from (seed, pass): a fresh batch
    per update as in the official searches, identical on every rank, and a function of the update count
    alone, so a resumed search scores on exactly the batches the uninterrupted one would have.
    """
    rotation, position = divmod(update, batches)
    order = torch.randperm(batches, generator=step_generator(seed, rotation, _HELDOUT_STREAM))
    return int(order[position])


class ArchitectureSearch:
    """Trains a family of sub-networks while a policy over them learns from held-out rewards.

    The trainer calls ``before_step`` (choose this step's sub-network) before each optimizer step and
    ``after_step`` after it; both must make the same choice on every rank, or DeepSpeed's collectives would
    pair different computations (a hang, or silently wrong gradients). ``check_agreement`` turns that into an
    error naming the step, and a digest of every choice per rank goes into the result.
    """

    name: str

    def __init__(self, seed: int, arms: int):
        self.seed = seed
        self.preferences = torch.zeros(arms, dtype=torch.float64)
        """One learnt preference per arm (DVP: softmax logits per layer; DAS: sigmoid scores per layer)."""
        self.updates = 0
        self.history: List[Dict[str, Any]] = []
        self._digest = hashlib.sha256()

    def before_step(self, step: int) -> None:
        raise NotImplementedError

    def after_step(self, step: int, heldout_loss: HeldOutLoss) -> Dict[str, float]:
        """Update the policy if this step is an update step; returns scalars to log (empty otherwise)."""
        raise NotImplementedError

    def result(self) -> Dict[str, Any]:
        raise NotImplementedError

    def check_agreement(self, step: int, choice: Any) -> None:
        """Every rank must have made ``choice``; records it in this rank's digest."""
        choices = all_gather_objects(choice)
        if any(c != choices[0] for c in choices):
            raise RuntimeError(f"{self.name} search: ranks chose different sub-networks at step {step}: {choices}")
        self._digest.update(json.dumps([step, choice]).encode())

    def state_dict(self) -> Dict[str, Any]:
        # The digest object cannot be serialised; a resumed run digests the steps it runs itself.
        return {"preferences": self.preferences.tolist(), "updates": self.updates, "history": self.history}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.preferences = torch.tensor(state["preferences"], dtype=torch.float64)
        self.updates, self.history = state["updates"], state["history"]

    def choice_digest(self) -> str:
        return self._digest.hexdigest()
