"""The extract pipeline: examples -> decoded, resized images (worker processes) -> CLIP features and/or the
resized images themselves (``store``) -> shards.

Work is planned as a fixed list of shards (``{split}-{index:06d}.tar``, ``samples_per_shard`` examples each,
in source order), so every run, every ``--part i/n`` and every resume agrees on which example goes where.
The manifest is rewritten atomically after each finished shard and is the resume state.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from memvp_ds.progress import progress

from data_prep.checks import check_sample_keys, check_split_names
from data_prep.clip_model import check_weights_available, load_visual
from data_prep.shards import write_shard
from data_prep.sources.base import Example, Source
from memvp_ds.atomic_io import atomic_open, write_json_atomic
from memvp_ds.data.shard_format import (
    FEATURES_MEMBER,
    IMAGE_COUNT_FIELD,
    IMAGE_MEMBER,
    MANIFEST,
    STORE_MODES,
    read_manifest,
    sha256_of,
    shard_name,
    split_counts,
    stored_members,
)
from memvp_ds.vision.clip_features import (
    ClipFeatureExtractor,
    FeatureRecipe,
    image_pixels,
    load_image,
    normalize_pixels,
)

log = logging.getLogger("data_prep")
TOOL_VERSION = "memvp_ds-data_prep 0.1.0"


@dataclass
class ExtractOptions:
    out_dir: str
    samples_per_shard: int = 1000
    shard_size_mb: Optional[float] = None
    """Target shard size; overrides samples_per_shard using the recipe's bytes per sample."""
    batch_size: int = 64
    num_workers: int = 4
    part_index: int = 0
    part_count: int = 1
    on_bad_image: str = "text-only"
    """What a missing or corrupt image turns its sample into: text-only (kept without features) or drop."""
    device: Optional[str] = None
    allow_download: bool = False
    store: str = "features"
    """What each image becomes: CLIP features, the resized image (for online CLIP training), or both."""


@dataclass
class ShardPlan:
    name: str
    split: str
    examples: List[Example]


def plan_shards(examples: Sequence[Example], samples_per_shard: int) -> List[ShardPlan]:
    plans: List[ShardPlan] = []
    per_split_index: Dict[str, int] = {}
    for example in examples:
        last = plans[-1] if plans else None
        if last is None or last.split != example.split or len(last.examples) >= samples_per_shard:
            index = per_split_index.get(example.split, 0)
            per_split_index[example.split] = index + 1
            last = ShardPlan(shard_name(example.split, index), example.split, [])
            plans.append(last)
        last.examples.append(example)
    return plans


def manifest_name(part_index: int, part_count: int) -> str:
    return MANIFEST if part_count == 1 else f"manifest.part-{part_index}-of-{part_count}.json"


class _ImageDataset(Dataset):
    """Decodes and resizes one image in a worker (uint8 pixels); failures become (None, reason). Its items are
    (example index, image path or None for a text-only example): a multi-image example has one per image."""

    def __init__(self, items: Sequence[Tuple[int, Optional[str]]], recipe: FeatureRecipe):
        self.items, self.recipe = items, recipe

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tuple[int, Optional[torch.Tensor], Optional[str]]:
        path = self.items[index][1]
        if path is None:
            return index, None, None
        try:
            return index, image_pixels(load_image(path), self.recipe), None
        except Exception as err:  # any decode failure is data, not a crash: count and report it
            return index, None, f"{type(err).__name__}: {err}"


def _collate(items):
    indices = [i for i, _, _ in items]
    images = [img for _, img, _ in items if img is not None]
    valid = [img is not None for _, img, _ in items]
    errors = [err for _, _, err in items]
    return indices, (torch.stack(images) if images else None), valid, errors


def _load_resumable(path: str, header: Dict[str, Any], out_dir: str) -> Dict[str, Dict[str, Any]]:
    """Entries of a previous run's manifest whose shard files are still intact (same settings only)."""
    if not os.path.isfile(path):
        return {}
    previous = read_manifest(path)
    if any(previous.data.get(k) != v for k, v in header.items()):
        log.warning("%s was written with different settings; starting over", path)
        return {}
    intact = {}
    for entry, stored in zip(previous.shards, previous.data.get("shards", [])):
        shard_path = os.path.join(out_dir, entry.name)
        if os.path.isfile(shard_path) and os.path.getsize(shard_path) == entry.bytes and sha256_of(shard_path) == entry.sha256:
            intact[entry.name] = stored
    return intact


def _source_location(source: Source) -> str:
    described = source.describe()
    return described.get("path") or described.get("root") or source.name


def _checked_examples(source: Source) -> List[Example]:
    """All examples, refused before anything is written if a split or a sample key is unsafe."""
    examples = list(source.examples())
    check_split_names(examples, _source_location(source))
    check_sample_keys(examples, _source_location(source))
    return examples


def _one_or_list(arrays: list):
    """What write_shard takes per sample: None, one image's array, or the list of a multi-image sample's."""
    return arrays if len(arrays) > 1 else (arrays[0] if arrays else None)


def run_extract(source: Source, recipe: FeatureRecipe, opts: ExtractOptions) -> Dict[str, Any]:
    """Extract (this part of) the dataset into shards; returns the manifest written.

    Bad options, unavailable weights and bad annotations (malformed records, unsafe split names, shared
    sample keys) raise before --out is created or any image is read.
    """
    if opts.on_bad_image not in ("text-only", "drop"):
        raise ValueError(f"--on-bad-image must be 'text-only' or 'drop', got '{opts.on_bad_image}'")
    if opts.store not in STORE_MODES:
        raise ValueError(f"--store must be one of {', '.join(STORE_MODES)}, got '{opts.store}'")
    if not 0 <= opts.part_index < opts.part_count:
        raise ValueError(f"--part {opts.part_index}/{opts.part_count}: index must be in [0, {opts.part_count})")
    check_weights_available(recipe, opts.allow_download)
    all_examples = _checked_examples(source)
    max_images = max((len(example.images) for example in all_examples), default=0)
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = ClipFeatureExtractor(load_visual(recipe, opts.allow_download), recipe).to(device)
    samples_per_shard = opts.samples_per_shard
    if opts.shard_size_mb:
        members = stored_members(opts.store)
        images_per_sample = sum(len(e.images) for e in all_examples) / max(len(all_examples), 1)
        bytes_per_sample = 2048 + images_per_sample * (
            (FEATURES_MEMBER in members) * extractor.tokens * extractor.dim * np.dtype(recipe.dtype).itemsize
            + (IMAGE_MEMBER in members) * 3 * recipe.image_size**2)  # PNG: at most raw size
        samples_per_shard = max(1, int(opts.shard_size_mb * 2**20 // bytes_per_sample))

    plans = plan_shards(all_examples, samples_per_shard)
    mine = [plan for ordinal, plan in enumerate(plans) if ordinal % opts.part_count == opts.part_index]
    header = {
        "tool": TOOL_VERSION,
        "source": source.describe(),
        "recipe": {**recipe.to_dict(), "tokens": extractor.tokens, "dim": extractor.dim},
        "store": opts.store,
        "samples_per_shard": samples_per_shard,
        "on_bad_image": opts.on_bad_image,
        "part": {"index": opts.part_index, "count": opts.part_count},
        "planned_shards": len(plans),
        **({"max_images": max_images} if max_images > 1 else {}),
    }
    os.makedirs(opts.out_dir, exist_ok=True)
    manifest_path = os.path.join(opts.out_dir, manifest_name(opts.part_index, opts.part_count))
    done = _load_resumable(manifest_path, header, opts.out_dir)
    todo = [plan for plan in mine if plan.name not in done]
    if done:
        log.info("resuming: %d of %d shards already complete and verified", len(done), len(mine))

    manifest = {**header, "complete": False, "shards": [done[p.name] for p in mine if p.name in done]}
    write_json_atomic(manifest_path, manifest)
    examples = [example for plan in todo for example in plan.examples]
    items = [(number, path) for number, example in enumerate(examples) for path in (example.images or [None])]
    loader = DataLoader(
        _ImageDataset(items, recipe),
        batch_size=opts.batch_size,
        num_workers=opts.num_workers,
        collate_fn=_collate,
        pin_memory=device == "cuda",
    )
    dtype = getattr(np, recipe.dtype)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    members = stored_members(opts.store)
    pending: List[Tuple[str, Dict[str, Any], Optional[np.ndarray], Optional[np.ndarray]]] = []
    pending_errors: List[Dict[str, str]] = []
    plan_iter = iter(todo)
    current, seen_in_current = next(plan_iter, None), 0
    rows, pixel_list, bad = [], [], []  # the current example's images so far
    start = time.time()
    with progress(total=len(items), unit="img", desc=f"extract part {opts.part_index}/{opts.part_count}") as bar:
        for indices, images, valid, errors in loader:
            features = pixels = None
            if images is not None and FEATURES_MEMBER in members:
                normalized = normalize_pixels(images.to(device, non_blocking=True), recipe.mean, recipe.std)
                with autocast:
                    features = extractor(normalized).float().cpu().numpy().astype(dtype)
            if images is not None and IMAGE_MEMBER in members:
                pixels = images.permute(0, 2, 3, 1).numpy()  # (B, S, S, 3) for PNG
            feature_rows = iter(features) if features is not None else iter(())
            pixel_rows = iter(pixels) if pixels is not None else iter(())
            for index, ok, error in zip(indices, valid, errors):
                number, path = items[index]
                example = examples[number]
                rows.append(next(feature_rows, None) if ok else None)
                pixel_list.append(next(pixel_rows, None) if ok else None)
                if error is not None:
                    bad.append({"key": example.key, "image": path, "reason": error})
                if index + 1 < len(items) and items[index + 1][0] == number:
                    continue  # more images of this example follow
                pending_errors += bad
                # A bad image makes its whole sample text-only or dropped: a multi-image sample without one of
                # its images would pair the others with the wrong tags.
                if not (bad and opts.on_bad_image == "drop"):
                    kept = [] if bad else [r for r in rows if r is not None]
                    pictures = [] if bad else [p for p in pixel_list if p is not None]
                    fields = {**example.fields, "has_image": bool(kept or pictures)}
                    if max(len(kept), len(pictures)) > 1:
                        fields[IMAGE_COUNT_FIELD] = max(len(kept), len(pictures))
                    pending.append((example.key, fields, _one_or_list(kept), _one_or_list(pictures)))
                rows, pixel_list, bad = [], [], []
                seen_in_current += 1
                if seen_in_current == len(current.examples):  # the shard's last example: close it
                    entry = write_shard(os.path.join(opts.out_dir, current.name), pending)
                    entry.update(split=current.split, errors=pending_errors)
                    manifest["shards"].append(entry)
                    write_json_atomic(manifest_path, manifest)
                    pending, pending_errors = [], []
                    current, seen_in_current = next(plan_iter, None), 0
            bar.update(len(indices))
    manifest["shards"].sort(key=lambda entry: (entry["split"], entry["name"]))
    manifest.update(complete=True, splits=split_counts(manifest["shards"]))
    write_json_atomic(manifest_path, manifest)
    _write_errors(opts.out_dir, manifest, opts)
    elapsed = time.time() - start
    log.info("extracted %d examples in %.1fs (%.1f img/s)", len(examples), elapsed, len(examples) / max(elapsed, 1e-9))
    return manifest


def _write_errors(out_dir: str, manifest: Dict[str, Any], opts: ExtractOptions) -> None:
    name = "errors.jsonl" if opts.part_count == 1 else f"errors.part-{opts.part_index}-of-{opts.part_count}.jsonl"
    with atomic_open(os.path.join(out_dir, name)) as f:
        for shard in manifest["shards"]:
            for error in shard.get("errors", []):
                f.write(json.dumps({**error, "shard": shard["name"]}) + "\n")
