"""Re-reading shards against their manifest, inspecting them, and merging the manifests of parts."""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Dict, List, Optional

import numpy as np

from data_prep.clip_model import preprocessing_summary
from memvp_ds.atomic_io import write_json_atomic
from memvp_ds.data.shard_format import (
    FEATURES_MEMBER,
    IMAGE_MEMBER,
    MANIFEST,
    read_manifest,
    image_count,
    read_shard,
    sha256_of,
    split_counts,
)

_PART = re.compile(r"manifest\.part-(\d+)-of-(\d+)\.json$")


def _non_finite_values(features: np.ndarray) -> Optional[str]:
    # fp16 storage turns activations beyond 65504 into inf; NaN or inf would poison training silently.
    nan, inf = int(np.isnan(features).sum()), int(np.isinf(features).sum())
    return f"{nan} NaN and {inf} inf feature values" if nan or inf else None


def verify(out_dir: str) -> List[str]:
    """Problems found (empty when every shard matches the manifest in count, checksum, feature shape and
    dtype, and image size, and every feature value is finite)."""
    manifest = read_manifest(out_dir)
    recipe = manifest.recipe
    expected_shape = (recipe["tokens"], recipe["dim"])
    image_shape = (recipe["image_size"], recipe["image_size"], 3)
    members = manifest.members
    problems: List[str] = []
    if not manifest.complete:
        problems.append(f"{out_dir}: manifest is not complete (extraction unfinished or parts not merged)")
    for entry in manifest.shards:
        path = os.path.join(out_dir, entry.name)
        if not os.path.isfile(path):
            problems.append(f"{entry.name}: missing")
            continue
        if os.path.getsize(path) != entry.bytes or sha256_of(path) != entry.sha256:
            problems.append(f"{entry.name}: size or sha256 differs from the manifest (corrupt or truncated)")
        try:
            count = with_image = 0
            for key, fields, features, image in read_shard(path, with_images=True):
                count += 1
                if features is not None:
                    expected = (expected_shape[0] * max(image_count(fields), 1), expected_shape[1])  # all its images
                    if features.shape != expected or str(features.dtype) != recipe["dtype"]:
                        problems.append(
                            f"{entry.name}: sample {key} has features {features.shape} {features.dtype}, "
                            f"expected {expected} {recipe['dtype']}"
                        )
                    non_finite = _non_finite_values(features)
                    if non_finite:
                        problems.append(f"{entry.name}: sample {key} has {non_finite}")
                images = image_count(fields)
                expected_image = image_shape if images <= 1 else (images, *image_shape)  # all its images
                if image is not None and image.shape != expected_image:
                    problems.append(f"{entry.name}: sample {key} has a {image.shape} image, expected {expected_image}")
                with_image += features is not None or image is not None
                present = {FEATURES_MEMBER: features is not None, IMAGE_MEMBER: image is not None}
                for member in (FEATURES_MEMBER, IMAGE_MEMBER):
                    expected = bool(fields.get("has_image")) and member in members
                    if present[member] != expected:
                        problems.append(f"{entry.name}: sample {key} {'has' if present[member] else 'lacks'} "
                                        f"a .{member} member (has_image {fields.get('has_image')}, store "
                                        f"{manifest.store})")
        except Exception as err:
            problems.append(f"{entry.name}: unreadable ({type(err).__name__}: {err})")
            continue
        if (count, with_image) != (entry.samples, entry.with_image):
            problems.append(
                f"{entry.name}: {count} samples ({with_image} with image), manifest says "
                f"{entry.samples} ({entry.with_image})"
            )
    return problems


def inspect(out_dir: str) -> str:
    """A short human-readable description: recipe, counts per split, errors, one sample."""
    manifest = read_manifest(out_dir)
    recipe = manifest.recipe
    lines = [
        f"source: {manifest.source}",
        f"recipe: {recipe['model']} ({recipe['pretrained']}), {recipe['layer']} layer, "
        f"{recipe['tokens']} x {recipe['dim']} {recipe['dtype']}",
        f"preprocessing: {preprocessing_summary(recipe)}",
        f"store: {manifest.store} (image {recipe['image_size']} px)",
    ]
    for split, counts in sorted(manifest.split_counts().items()):
        lines.append(f"{split}: {counts['samples']} samples, {counts['with_image']} with image, {counts['shards']} shards")
    lines.append(f"image errors: {manifest.bad_images}")
    if manifest.shards:
        key, fields, features, image = next(read_shard(os.path.join(out_dir, manifest.shards[0].name),
                                                       with_images=True))
        shape = "none" if features is None else f"{features.shape} {features.dtype}"
        pixels = "none" if image is None else f"{image.shape} {image.dtype}"
        lines.append(f"first sample {key}: features {shape}; image {pixels}; fields {json.dumps(fields)[:300]}")
    return "\n".join(lines)


def merge(out_dir: str) -> Dict[str, Any]:
    """Combine ``manifest.part-i-of-n.json`` of all n parts into ``manifest.json``."""
    parts = {}
    for path in glob.glob(os.path.join(out_dir, "manifest.part-*-of-*.json")):
        index, count = map(int, _PART.search(path).groups())
        parts[index] = (count, read_manifest(path).data)
    if not parts:
        raise FileNotFoundError(f"no manifest.part-*-of-*.json in {out_dir}")
    counts = {count for count, _ in parts.values()}
    if len(counts) != 1:
        raise ValueError(f"{out_dir}: part manifests disagree on the number of parts: {sorted(counts)}")
    count = counts.pop()
    missing = sorted(set(range(count)) - set(parts))
    if missing:
        raise ValueError(f"{out_dir}: parts {missing} of {count} have no manifest")
    first = parts[0][1]
    shards = []
    for index in range(count):
        part = parts[index][1]
        if not part.get("complete"):
            raise ValueError(f"{out_dir}: part {index} of {count} is not complete")
        for key in ("source", "recipe", "samples_per_shard", "tool", "store"):
            if part.get(key) != first.get(key):
                raise ValueError(f"{out_dir}: part {index} differs from part 0 in '{key}'")
        shards += part["shards"]
    shards.sort(key=lambda entry: (entry["split"], entry["name"]))
    merged = {key: first[key] for key in ("tool", "source", "recipe", "samples_per_shard", "on_bad_image")}
    merged["store"] = first.get("store", "features")
    if "max_images" in first:  # the same in every part: counted over the whole dataset
        merged["max_images"] = first["max_images"]
    merged.update(part={"index": 0, "count": 1}, merged_from=count, complete=True, shards=shards)
    merged.update(planned_shards=first["planned_shards"], splits=split_counts(shards))
    if len(shards) != first["planned_shards"]:
        raise ValueError(f"{out_dir}: parts hold {len(shards)} shards, {first['planned_shards']} were planned")
    write_json_atomic(os.path.join(out_dir, MANIFEST), merged)
    return merged
