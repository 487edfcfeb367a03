"""The shard format, owned here and shared by the writer (data_prep) and every reader (training, evaluation,
verify, tests).

A data folder holds ``{split}-{index:06d}.tar`` WebDataset shards and ``manifest.json``. Each sample is
``<key>.json`` (its text fields, ``has_image``) and, when it has an image, ``<key>.npy`` (the CLIP features,
N x C, stored with numpy's format and never unpickled; a sample with several images, ``image_count`` of them in
its fields, stores the further ones' as ``<key>.1.npy``, ``<key>.2.npy``, ... in the order of their ``<image>``
tags, and the manifest's ``max_images`` is the most any sample has) and/or ``<key>.png`` (the image after the recipe's
resize, 8-bit RGB, for the online vision tower; further images ``<key>.1.png``, ... likewise), as the manifest's
``store`` says (features, images or both;
absent: features). The manifest lists every shard with its split, sample count, size and sha256, and the
feature ``recipe`` (how the features were made: tokens, dim, dtype, model, image size, mean/std).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import braceexpand
import numpy as np

MANIFEST = "manifest.json"
FIELDS_MEMBER = "json"
"""Member suffix of a sample's text fields."""
FEATURES_MEMBER = "npy"
"""Member suffix of a sample's features."""
IMAGE_COUNT_FIELD = "image_count"
"""Field of a sample with more than one image: how many (absent: 1 with ``has_image``, else 0)."""
IMAGE_MEMBER = "png"
"""Member suffix of a sample's resized image (online vision tower)."""
STORE_MODES = ("features", "images", "both")
"""What shards carry per image: CLIP features, the resized image, or both (manifest key ``store``)."""
REMOTE_PREFIXES = ("http:", "https:", "s3:", "gs:")
"""URL schemes read by a WebDataset reader without a local file check."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def features_member(index: int) -> str:
    """Member suffix of a sample's ``index``-th image's features: ``npy`` for the first (so single-image shards
    are unchanged), ``1.npy``, ``2.npy``, ... for the further images of a multi-image sample."""
    return FEATURES_MEMBER if index == 0 else f"{index}.{FEATURES_MEMBER}"


def image_member(index: int) -> str:
    """Member suffix of a sample's ``index``-th stored image: ``png``, then ``1.png``, ``2.png``, ..."""
    return IMAGE_MEMBER if index == 0 else f"{index}.{IMAGE_MEMBER}"


def image_count(fields: Dict[str, Any]) -> int:
    """Images a stored sample has (its fields as stored)."""
    return int(fields.get(IMAGE_COUNT_FIELD, 1 if fields.get("has_image") else 0))


def encode_features(features: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, features, allow_pickle=False)
    return buffer.getvalue()


def decode_features(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_image(pixels: np.ndarray) -> bytes:
    """(S, S, 3) uint8 RGB -> PNG bytes (lossless, deterministic for the same pixels)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """PNG bytes -> (S, S, 3) uint8 RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.mode != "RGB":
            raise ValueError(f"stored image is {image.mode}, expected RGB")
        return np.asarray(image.convert("RGB"))


def stored_members(store: str) -> Tuple[str, ...]:
    """The per-image member suffixes of shards made with ``store`` (features, images or both)."""
    if store not in STORE_MODES:
        raise ValueError(f"manifest: unknown store '{store}' (one of {', '.join(STORE_MODES)})")
    return {"features": (FEATURES_MEMBER,), "images": (IMAGE_MEMBER,), "both": (FEATURES_MEMBER, IMAGE_MEMBER)}[store]


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it."""

    name: str
    split: str
    samples: int
    with_image: Optional[int] = None
    bytes: Optional[int] = None
    sha256: Optional[str] = None
    """None where a hand-written manifest leaves the entry out (data_prep always writes it)."""
    errors: Tuple[Dict[str, str], ...] = ()
    """Images that could not be read while the shard was written (key, image, reason)."""


@dataclass(frozen=True)
class Manifest:
    """A data folder's manifest, as readers see it (the writers, data_prep's extract and merge, build the
    stored JSON, ``data``, themselves)."""

    data: Dict[str, Any]
    path: str = ""

    @property
    def shards(self) -> List[ShardEntry]:
        """Every listed shard, in the stored order."""
        return [ShardEntry(entry["name"], entry["split"], entry["samples"], entry.get("with_image"),
                           entry.get("bytes"), entry.get("sha256"), tuple(entry.get("errors", ())))
                for entry in self.data.get("shards", [])]

    def shards_of(self, split: str) -> List[ShardEntry]:
        """The shards of ``split``, in name order."""
        return sorted((s for s in self.shards if s.split == split), key=lambda s: s.name)

    @property
    def sizes(self) -> Dict[str, int]:
        """Samples per shard name."""
        return {s.name: s.samples for s in self.shards}

    @property
    def recipe(self) -> Dict[str, Any]:
        """How the features (and stored images) were made: tokens, dim, dtype, model, image size, mean/std."""
        return self.data["recipe"]

    @property
    def store(self) -> str:
        return self.data.get("store", "features")

    @property
    def members(self) -> Tuple[str, ...]:
        """The per-image member suffixes the shards carry."""
        return stored_members(self.store)

    @property
    def max_images(self) -> int:
        """The most images any sample of the extraction has (1 for single-image data)."""
        return int(self.data.get("max_images", 1))

    @property
    def complete(self) -> Optional[bool]:
        """True once every planned shard is written (and parts merged); None in manifests from before the key."""
        return self.data.get("complete")

    @property
    def source(self) -> Dict[str, Any]:
        return self.data["source"]

    def split_counts(self) -> Dict[str, Dict[str, int]]:
        return split_counts(self.data["shards"])

    @property
    def bad_images(self) -> int:
        return sum(len(s.errors) for s in self.shards)


def read_manifest(path: str) -> Manifest:
    """The manifest at ``path``, or in the folder ``path``."""
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    with open(path) as f:
        return Manifest(json.load(f), path)


def split_counts(shards: Iterable[Dict[str, Any]]) -> Dict[str, Dict[str, int]]:
    """Per split: samples, samples with an image, shards."""
    counts: Dict[str, Dict[str, int]] = {}
    for shard in shards:
        entry = counts.setdefault(shard["split"], {"samples": 0, "with_image": 0, "shards": 0})
        entry["samples"] += shard["samples"]
        entry["with_image"] += shard["with_image"]
        entry["shards"] += 1
    return counts


def split_urls(folder: str, split: str, manifest: Optional[Manifest] = None) -> List[str]:
    """Paths of every shard that the manifest in ``folder`` (or ``manifest``, one read or written already)
    lists for ``split``, in name order ([] when it lists none). A listed shard missing from the folder is an
    error naming it."""
    manifest = manifest if manifest is not None else read_manifest(folder)
    urls = [os.path.join(folder, s.name) for s in manifest.shards_of(split)]
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) listed in {os.path.join(folder, MANIFEST)} not found, "
                                f"e.g. {missing[0]}")
    return urls


def shard_urls(spec: str) -> List[str]:
    """Expand '::'-separated brace patterns; local paths must exist, 'pipe:' and remote URLs are kept."""
    urls: List[str] = []
    for part in spec.split("::"):
        urls += list(braceexpand.braceexpand(part.strip()))
    if not urls:
        raise ValueError(f"no shards in '{spec}'")
    missing = [u for u in urls if not u.startswith(("pipe:",) + REMOTE_PREFIXES) and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[0]} (from '{spec}')")
    return urls


def read_raw_samples(path: str) -> Iterator[Dict[str, Any]]:
    """Every sample of a local shard, in order, as WebDataset readers give it: ``{"__key__": key, member
    suffix: bytes}`` (what ``memvp_ds.data.collate.SampleEncoder`` takes)."""
    samples: Dict[str, Dict[str, Any]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = os.path.basename(member.name).partition(".")
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    yield from samples.values()


def read_shard(path: str, with_images: bool = False) -> Iterator[Tuple]:
    """(key, fields, features-or-None) of every sample of a local shard, in order (a multi-image sample's
    features concatenated in image order, (n x N, C)); with ``with_images``, (key, fields, features-or-None,
    image-or-None), the image (S, S, 3) or, for a multi-image sample, its n images stacked (n, S, S, 3)."""
    for members in read_raw_samples(path):
        fields = json.loads(members[FIELDS_MEMBER])
        count = max(image_count(fields), 1)
        arrays = [decode_features(members[features_member(i)]) for i in range(count) if features_member(i) in members]
        features = (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)) if arrays else None
        if with_images:
            images = [decode_image(members[image_member(i)]) for i in range(count) if image_member(i) in members]
            yield members["__key__"], fields, features, (
                (images[0] if len(images) == 1 else np.stack(images)) if images else None)
        else:
            yield members["__key__"], fields, features
