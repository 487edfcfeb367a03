"""Sizing a run from its shards: which URLs, how many samples, how many steps. Reads only the manifest."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from memvp_ds.config import Config, ConfigError
from memvp_ds.data.shard_format import MANIFEST, read_manifest, shard_urls


@dataclass
class DataPlan:
    train_urls: List[str]
    val_urls: Optional[List[str]]
    train_samples: int
    shard_samples: Dict[str, int]
    """Manifest sample count per shard file name: a shard that yields fewer was truncated."""
    feature_recipe: Dict[str, Any]
    """How the shards' features were made; stored in the export so inference can make the same ones."""
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def _read_checked_manifest(cfg: Config, first_shard: str) -> Dict[str, Any]:
    path = cfg.data.manifest or os.path.join(os.path.dirname(first_shard), MANIFEST)
    if not os.path.isfile(path):
        raise ConfigError(f"data.manifest: {path} not found (data_prep writes it next to the shards)")
    manifest = read_manifest(path)
    recipe = manifest["recipe"]
    if (recipe["tokens"], recipe["dim"]) != (cfg.model.visual_tokens, cfg.model.visual_dim):
        raise ConfigError(
            f"{path}: shards hold {recipe['tokens']} x {recipe['dim']} features but model.visual_tokens x "
            f"model.visual_dim is {cfg.model.visual_tokens} x {cfg.model.visual_dim}"
        )
    return manifest


def plan_data(cfg: Config, world_size: int) -> DataPlan:
    """Check shards and manifest against the config and size the run; no model is touched."""
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards is not set")
    train_urls = shard_urls(cfg.data.train_shards)
    val_urls = shard_urls(cfg.data.val_shards) if cfg.data.val_shards else None
    manifest = _read_checked_manifest(cfg, train_urls[0])
    listed = {s["name"] for s in manifest["shards"]}
    unlisted = [u for u in train_urls if os.path.basename(u) not in listed]
    if unlisted:  # unknown provenance: its features may come from another recipe than the one checked above
        raise ConfigError(f"data.train_shards: {len(unlisted)} shard(s) not listed in the manifest "
                          f"{cfg.data.manifest or 'next to the shards'}, e.g. {unlisted[0]}")
    names = {os.path.basename(u) for u in train_urls}
    samples = sum(s["samples"] for s in manifest["shards"] if s["name"] in names)
    if samples == 0:
        raise ConfigError(f"data.train_shards: the manifest lists no samples for {sorted(names)[:3]}...")
    global_batch = cfg.train.global_batch(world_size)
    steps_per_epoch = max(1, samples // global_batch)
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    warmup = min(total, round(cfg.train.warmup_epochs * steps_per_epoch))
    counts = {s["name"]: s["samples"] for s in manifest["shards"]}
    return DataPlan(train_urls, val_urls, samples, counts, manifest["recipe"], steps_per_epoch, total, warmup)
