"""Sizing a run from its shards: which URLs each split uses, how many samples, how many steps. Reads only
the manifest (and checks that the shards it names are there with the listed sizes)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from memvp_ds.config import Config, ConfigError
from memvp_ds.data.shard_format import (
    FEATURES_MEMBER,
    IMAGE_MEMBER,
    MANIFEST,
    REMOTE_PREFIXES,
    Manifest,
    ShardEntry,
    read_manifest,
    shard_urls,
    split_urls,
)

SPLITS = ("train", "val", "test")
ONLINE_RECIPE_KEYS = ("image_size", "mean", "std", "layer", "keep_cls", "ln_post")
"""Recipe entries the shards' manifest and an online vision tower (model.vision.recipe) must agree on."""


@dataclass
class SplitShards:
    """The shards one split reads, and how much of the manifest's split that covers."""

    urls: List[str]
    source: str
    """'manifest' (every shard listed for the split in data.shards) or 'explicit' (data.<split>_shards)."""
    shards_used: int
    shards_listed: int
    samples_used: int
    samples_listed: int

    def coverage(self) -> Dict[str, Any]:
        return {"source": self.source, "shards": f"{self.shards_used}/{self.shards_listed}",
                "samples": f"{self.samples_used}/{self.samples_listed}"}


@dataclass
class DataPlan:
    splits: Dict[str, SplitShards]
    """Per split (train, val, test) the shards it reads; a split without shards is absent."""
    train_samples: int
    shard_samples: Dict[str, int]
    """Manifest sample count per shard file name: a shard that yields fewer was truncated."""
    feature_recipe: Dict[str, Any]
    """How the shards' features were made; stored in the export so inference can make the same ones."""
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @property
    def train_urls(self) -> List[str]:
        return self.splits["train"].urls

    @property
    def val_urls(self) -> Optional[List[str]]:
        return self.splits["val"].urls if "val" in self.splits else None


def manifest_path(cfg: Config) -> Optional[str]:
    """data.manifest, else the one in data.shards, else the one next to the first explicit training shard."""
    if cfg.data.manifest:
        return cfg.data.manifest
    if cfg.data.shards:
        return os.path.join(cfg.data.shards, MANIFEST)
    spec = cfg.data.train_shards or cfg.data.val_shards or cfg.data.test_shards
    if spec and not spec.startswith(("pipe:",) + REMOTE_PREFIXES):
        return os.path.join(os.path.dirname(shard_urls(spec)[0]), MANIFEST)
    return None


def load_checked_manifest(cfg: Config) -> Manifest:
    """The run's manifest, complete, with features of the shape the model expects."""
    path = manifest_path(cfg)
    if path is None:
        raise ConfigError("data.shards: not set (the data_prep output folder); or give data.manifest for remote shards")
    if not os.path.isfile(path):
        raise ConfigError(f"data.manifest: {path} not found (data_prep writes it next to the shards)")
    manifest = read_manifest(path)
    if manifest.complete is False:
        raise ConfigError(f"{path}: the extraction is incomplete (still running, interrupted, or parts not merged)")
    recipe = manifest.recipe
    if (recipe["tokens"], recipe["dim"]) != (cfg.model.visual_tokens, cfg.model.visual_dim):
        raise ConfigError(
            f"{path}: shards hold {recipe['tokens']} x {recipe['dim']} features but model.visual_tokens x "
            f"model.visual_dim is {cfg.model.visual_tokens} x {cfg.model.visual_dim}"
        )
    if manifest.max_images > cfg.data.max_images:
        raise ConfigError(f"{path}: samples have up to {manifest.max_images} images but data.max_images is "
                          f"{cfg.data.max_images}")
    _check_store(cfg, path, manifest)
    return manifest


def _check_store(cfg: Config, path: str, manifest: Manifest) -> None:
    """The shards carry what the model reads: features, or images made by the online tower's recipe."""
    members, vision = manifest.members, cfg.model.vision
    if not vision.online:
        if FEATURES_MEMBER not in members:
            raise ConfigError(f"{path}: shards hold images only (store '{manifest.store}'); set "
                              "model.vision.online=true or extract with --store features|both")
        return
    if IMAGE_MEMBER not in members:
        raise ConfigError(f"{path}: model.vision.online needs shards with images; these hold features only "
                          "(extract with memvp-prep extract --store images|both)")
    recipe = manifest.recipe
    for key in ONLINE_RECIPE_KEYS:
        if recipe.get(key, True) != getattr(vision.recipe, key):  # manifests before ln_post: applied
            raise ConfigError(f"{path}: shards were made with {key}={recipe.get(key, True)} but model.vision.recipe.{key} "
                              f"is {getattr(vision.recipe, key)}")


def _check_sizes(urls: List[str], listed: Dict[str, ShardEntry]) -> None:
    """A local shard whose size differs from the manifest's is damaged or from another extraction."""
    for url in urls:
        entry = listed.get(os.path.basename(url))
        if entry and entry.bytes is not None and os.path.isfile(url) and os.path.getsize(url) != entry.bytes:
            raise ConfigError(f"{url}: {os.path.getsize(url)} bytes, the manifest lists {entry.bytes} "
                              f"(truncated? run memvp-prep verify)")


def resolve_split(cfg: Config, split: str, manifest: Optional[Manifest] = None) -> Optional[SplitShards]:
    """The shards ``split`` reads: data.<split>_shards when set, else every shard that the manifest in
    data.shards lists for the split. None when the split has no shards. Explicit shards must be listed in
    the manifest under that split."""
    explicit = getattr(cfg.data, f"{split}_shards")
    if not explicit and not cfg.data.shards:
        return None
    manifest = manifest if manifest is not None else load_checked_manifest(cfg)
    listed = {s.name: s for s in manifest.shards_of(split)}
    if explicit:
        urls, source = shard_urls(explicit), "explicit"
        unknown = [u for u in urls if os.path.basename(u) not in listed]
        if unknown:
            raise ConfigError(f"data.{split}_shards: {unknown[0]} is not a {split} shard of {manifest_path(cfg)}")
    else:
        urls, source = split_urls(cfg.data.shards, split), "manifest"
        if not urls:
            return None
    _check_sizes(urls, listed)
    used = [listed[os.path.basename(u)] for u in urls]
    return SplitShards(urls, source, len(used), len(listed), sum(s.samples for s in used),
                       sum(s.samples for s in listed.values()))


def plan_data(cfg: Config, world_size: int) -> DataPlan:
    """Check shards and manifest against the config and size the run; no model is touched."""
    if not cfg.data.shards and not cfg.data.train_shards:
        raise ConfigError(f"data.shards: not set (the data_prep output folder holding {MANIFEST})")
    manifest = load_checked_manifest(cfg)
    splits = {split: shards for split in SPLITS if (shards := resolve_split(cfg, split, manifest)) is not None}
    if "train" not in splits or splits["train"].samples_used == 0:
        raise ConfigError(f"data.shards: {manifest_path(cfg)} lists no training samples")
    if cfg.train.mode != "train" and "val" not in splits:
        raise ConfigError(f"train.mode={cfg.train.mode} scores sub-networks on held-out data: the manifest lists "
                          f"no val shards and data.val_shards is not set")
    samples = splits["train"].samples_used
    global_batch = cfg.train.global_batch(world_size)
    steps_per_epoch = max(1, samples // global_batch)
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    warmup = min(total, round(cfg.train.warmup_epochs * steps_per_epoch))
    return DataPlan(splits, samples, manifest.sizes, manifest.recipe, steps_per_epoch, total, warmup)
