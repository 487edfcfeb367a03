"""Request images: fetched only from ``data:`` URLs or files under ``--image-root``, size-checked before
they are decoded, and encoded as the export was trained (the feature recipe of its shards, through the same
CLIP code as data_prep and memvp-predict; an online-CLIP export gets the resized pixels and runs its own
tower with its adapters)."""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any, Dict, List, Optional

import torch
from PIL import Image

from memvp_ds.serve.limits import ServeLimits
from memvp_ds.serve.prompting import RequestError
from memvp_ds.vision.clip_features import (ClipFeatureExtractor, FeatureRecipe, image_pixels, load_clip_visual,
                                           normalize_pixels)

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def _data_url_bytes(url: str, field: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise RequestError(f"{field}: a data URL must look like data:image/png;base64,...", field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field}: the data URL's payload is not valid base64", field) from None


def _file_bytes(url: str, field: str, image_root: Optional[str], limit: int) -> bytes:
    if image_root is None:
        raise RequestError(f"{field}: only data: URLs are accepted (the server has no --image-root)", field)
    path = url[len("file://"):] if url.startswith("file://") else url
    root = os.path.realpath(image_root)
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root or not os.path.isfile(full):
        raise RequestError(f"{field}: no such file under --image-root", field)
    if os.path.getsize(full) > limit:
        raise RequestError(f"{field}: the image file exceeds the {limit}-byte limit", field, 413, "image_too_large")
    with open(full, "rb") as f:
        return f.read()


def read_image(url: str, field: str, limits: ServeLimits, image_root: Optional[str]) -> Image.Image:
    """The RGB image an ``image_url`` names; RequestError naming ``field`` for anything else."""
    if url.startswith("data:"):
        # base64 is 4/3 of the bytes: refuse before decoding a payload that must be too large.
        if len(url) * 3 // 4 > limits.max_image_bytes + 3:
            raise RequestError(f"{field}: the image exceeds the {limits.max_image_bytes}-byte limit", field, 413,
                               "image_too_large")
        data = _data_url_bytes(url, field)
    elif url.startswith(("http://", "https://", "ftp://")):
        raise RequestError(f"{field}: remote URLs are refused; send the image as a data: URL", field)
    else:
        data = _file_bytes(url, field, image_root, limits.max_image_bytes)
    if len(data) > limits.max_image_bytes:
        raise RequestError(f"{field}: the image exceeds the {limits.max_image_bytes}-byte limit", field, 413,
                           "image_too_large")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            # The header gives the size: a decompression bomb is refused before its pixels exist.
            if image.width * image.height > limits.max_image_pixels:
                raise RequestError(f"{field}: {image.width}x{image.height} pixels exceed the limit of "
                                   f"{limits.max_image_pixels}", field, 413, "image_too_large")
            image.load()
            return image.convert("RGB")
    except RequestError:
        raise
    except Exception as err:  # PIL raises several types for unreadable data
        raise RequestError(f"{field}: not a PNG, JPEG or WebP image ({type(err).__name__})", field) from None


class ImageEncoder:
    """Images -> what the model takes: (B, N, C) features by the export's recipe, or (B, 3, S, S) uint8
    pixels for an online-CLIP export. Rows without an image get zeros (and has_image False). With
    ``max_images`` k > 1 (a model trained on several images per sample) each row has k slots, as training
    batches do: (B, k x N, C) features or (B, k x 3, S, S) pixels, and (B, k) ``has_image``."""

    def __init__(self, recipe: Dict[str, Any], online: bool, clip_pretrained: Optional[str] = None,
                 device: str = "cpu", max_images: int = 1):
        overrides = {"pretrained": clip_pretrained} if clip_pretrained and not online else {}
        self.recipe, self.online, self.max_images = FeatureRecipe.from_stored(recipe, **overrides), online, max_images
        self.device = torch.device(device)
        self.extractor = None if online else ClipFeatureExtractor(load_clip_visual(self.recipe), self.recipe).to(
            self.device).eval()

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) uint8: the recipe's resize (done per request, off the decode loop)."""
        return image_pixels(image, self.recipe)

    def encode(self, images: List[List[torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """The model's visual keyword arguments for a batch of rows, each the list of its images' pixels (up to
        ``max_images``; none for a text-only row)."""
        slots = self.max_images
        has_image = torch.tensor([[slot < len(row) for slot in range(slots)] for row in images])
        size = self.recipe.image_size
        empty = torch.zeros(3, size, size, dtype=torch.uint8)
        stacked = torch.stack([row[slot] if slot < len(row) else empty for row in images for slot in range(slots)])
        flags = has_image if slots > 1 else has_image[:, 0]
        if self.online:
            return {"images": stacked.view(len(images), slots * 3, size, size), "has_image": flags}
        # Stored features are rounded to the recipe's dtype, so the model gets what it was trained on.
        features = self.extractor(normalize_pixels(stacked.to(self.device), self.recipe.mean, self.recipe.std))
        features = features.to(getattr(torch, self.recipe.dtype)).float()
        features = features * has_image.view(-1, 1, 1).to(self.device)
        return {"image_features": features.view(len(images), slots * features.shape[1], features.shape[2]),
                "has_image": flags}
