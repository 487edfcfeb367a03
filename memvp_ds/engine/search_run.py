"""A search inside the training loop (train.mode=dvp_search | das_search): the policy's step hooks, held-out
scoring and the finish (search.json). Plain training gets ``NoSearch``, whose hooks do nothing, so the loop
has no search branches."""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from memvp_ds.distributed import DistInfo, all_gather_objects
from memvp_ds.run_folder import RunFolder
from memvp_ds.search import ArchitectureSearch, heldout_batch_index

log = logging.getLogger("memvp_ds")
Batches = Iterable[Dict[str, Any]]


class NoSearch:
    """Plain training: nothing to choose before a step, nothing to score after it, nothing to write."""

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> Dict[str, float]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        """Extra checkpoint state: none."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def finish(self, step: int) -> bool:
        """Whether the run's finish is the search's (True) or training's evaluation and export (False)."""
        return False


class SearchRun(NoSearch):
    """An architecture search driven by the trainer.

    ``heldout_batches()`` yields this rank's held-out micro-batches (padding rows without labels);
    ``loss_of(batches, dropout)`` is the token-weighted loss over them, averaged over ranks, without gradient,
    dropout on or off.
    """

    def __init__(self, search: ArchitectureSearch, dist_info: DistInfo, run: RunFolder, seed: int, max_batches: int,
                 heldout_batches: Callable[[], Iterator[Dict[str, Any]]], loss_of: Callable[[Batches, bool], float]):
        self.search, self.dist, self.run, self.seed = search, dist_info, run, seed
        self._max_batches, self._heldout_batches, self._loss_of = max_batches, heldout_batches, loss_of
        self._heldout: List[Dict[str, Any]] = []

    def before_step(self, step: int) -> None:
        self.search.before_step(step)

    def after_step(self, step: int) -> Dict[str, float]:
        """Update the policy; its TensorBoard scalars."""
        return self.search.after_step(step, self._heldout_loss)

    def state_dict(self) -> Dict[str, Any]:
        return {"search": self.search.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.search.load_state_dict(state["search"])

    def _heldout_loss(self, update: int, dropout: bool = False) -> float:
        """Mean loss over ranks on the held-out batch of policy update ``update``: a search's reward input
        (``dropout``: scored in training mode, as the official KAB-APP does).

        The rank's share of the val split (or its first ``search.heldout_batches`` micro-batches) is read
        once; updates rotate over it in the order ``heldout_batch_index`` draws, which depends on the update
        count alone, so a resumed search scores on exactly the batches the uninterrupted one would have.
        Every rank holds the same number of batches, so all ranks pick the same index.
        """
        if not self._heldout:
            self._heldout = list(itertools.islice(self._heldout_batches(), self._max_batches))
        return self._loss_of([self._heldout[heldout_batch_index(update, len(self._heldout), self.seed)]], dropout)

    def finish(self, step: int) -> bool:
        """search.json: the choice (read by ``from_search``), the policy, the history, each rank's digest."""
        digests = all_gather_objects(self.search.choice_digest())
        if self.dist.is_main:
            result = self.search.result()
            self.run.write_search_result({**result, "steps": step, "choice_digest_per_rank": digests})
            log.info("search result: %s", {k: v for k, v in result.items() if k != "history"})
        return True


def build_search_run(search: Optional[ArchitectureSearch], **kwargs) -> NoSearch:
    """``SearchRun`` around ``search``, or ``NoSearch`` for plain training (``search`` None)."""
    return NoSearch() if search is None else SearchRun(search, **kwargs)
