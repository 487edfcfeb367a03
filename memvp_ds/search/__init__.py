"""Architecture searches run by the trainer (train.mode): DVP's insertion layer and DAS's skipped layers."""

from __future__ import annotations

from typing import List, Optional

from memvp_ds.config import Config
from memvp_ds.model.llm import num_decoder_layers
from memvp_ds.search.base import ArchitectureSearch, heldout_batch_index
from memvp_ds.search.das import LayerSkipSearch
from memvp_ds.search.dvp import DVPLayerSearch


def skippable_layers(cfg: Config) -> List[int]:
    """Layers a DAS search toggles (they get adapters but stay in the model); none outside das_search."""
    if cfg.train.mode != "das_search":
        return []
    if cfg.search.das.candidates is not None:
        return list(cfg.search.das.candidates)
    return list(range(num_decoder_layers(cfg.model.llm)))


def build_search(cfg: Config, model, total_steps: int) -> Optional[ArchitectureSearch]:
    """The search of ``train.mode`` for a run of ``total_steps`` optimizer steps (None: plain training)."""
    if cfg.train.mode == "dvp_search":
        return DVPLayerSearch(model.strategy, cfg.search.dvp, cfg.train.seed)
    if cfg.train.mode == "das_search":
        return LayerSkipSearch(model.skipping, cfg.search.das, cfg.train.seed, total_steps)
    return None


__all__ = ["ArchitectureSearch", "build_search", "heldout_batch_index", "skippable_layers"]
