"""Writing shards: deterministic tar files and their manifest entries. The format itself (member names,
feature encoding, manifest, readers) belongs to the library: memvp_ds.data.shard_format."""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Any, Dict, Iterable, Tuple

import numpy as np

from memvp_ds.data.shard_format import (
    FIELDS_MEMBER,
    encode_features,
    encode_image,
    features_member,
    image_member,
    sha256_of,
)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (mtime 0, no owner) makes a shard's bytes depend only on its content, so a resumed
    # or re-split extraction is checksum-identical to a single uninterrupted run.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, samples: Iterable[Tuple]) -> Dict[str, Any]:
    """Write (key, fields, features-or-None[, image-or-None]) samples to ``path`` atomically; return the
    manifest entry. Features are one (N, C) array, or a list of them for a multi-image sample (stored as
    ``features_member(i)``). An image is the (S, S, 3) uint8 RGB array after the recipe's resize, or a list of
    them (``image_member(i)``)."""
    tmp = path + ".tmp"
    count = with_image = 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields, features, *image in samples:
            image = image[0] if image else None
            _add_member(tar, f"{key}.{FIELDS_MEMBER}", json.dumps(fields, sort_keys=True).encode())
            for index, array in enumerate([features] if isinstance(features, np.ndarray) else features or []):
                _add_member(tar, f"{key}.{features_member(index)}", encode_features(array))
            for index, pixels in enumerate([image] if isinstance(image, np.ndarray) else image or []):
                _add_member(tar, f"{key}.{image_member(index)}", encode_image(pixels))
            with_image += features is not None or image is not None
            count += 1
    os.replace(tmp, path)
    return {
        "name": os.path.basename(path),
        "samples": count,
        "with_image": with_image,
        "bytes": os.path.getsize(path),
        "sha256": sha256_of(path),
    }
