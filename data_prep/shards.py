"""Deterministic tar shards, their checksums, and the manifest that describes them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np

MANIFEST = "manifest.json"


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_features(features: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, features, allow_pickle=False)
    return buffer.getvalue()


def decode_features(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (mtime 0, no owner) makes a shard's bytes depend only on its content, so a resumed
    # or re-split extraction is checksum-identical to a single uninterrupted run.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, samples: Iterable[Tuple[str, Dict[str, Any], Optional[np.ndarray]]]) -> Dict[str, Any]:
    """Write (key, fields, features-or-None) samples to ``path`` atomically; return the manifest entry."""
    tmp = path + ".tmp"
    count = with_image = 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields, features in samples:
            _add_member(tar, f"{key}.json", json.dumps(fields, sort_keys=True).encode())
            if features is not None:
                _add_member(tar, f"{key}.npy", encode_features(features))
                with_image += 1
            count += 1
    os.replace(tmp, path)
    return {
        "name": os.path.basename(path),
        "samples": count,
        "with_image": with_image,
        "bytes": os.path.getsize(path),
        "sha256": sha256_of(path),
    }


def read_manifest(path: str) -> Dict[str, Any]:
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    with open(path) as f:
        return json.load(f)


def split_counts(shards: Iterable[Dict[str, Any]]) -> Dict[str, Dict[str, int]]:
    counts: Dict[str, Dict[str, int]] = {}
    for shard in shards:
        entry = counts.setdefault(shard["split"], {"samples": 0, "with_image": 0, "shards": 0})
        entry["samples"] += shard["samples"]
        entry["with_image"] += shard["with_image"]
        entry["shards"] += 1
    return counts
