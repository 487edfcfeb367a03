"""Turning stored samples into model inputs: tokenisation (in loader workers) and padding into batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from memvp_ds.data.prompts import IGNORE_INDEX, build_segments, encode_segments
from memvp_ds.data.shard_format import FEATURES_MEMBER, FIELDS_MEMBER, decode_features


class FeatureShapeError(ValueError):
    """Stored features whose shape is not the model's: the shard disagrees with its manifest or the model,
    so every image sample of it would fail; never skipped sample by sample."""


@dataclass
class TokenizedSample:
    key: str
    input_ids: List[int]
    labels: List[int]
    features: Optional[np.ndarray]
    fields: Dict[str, Any]


class SampleEncoder:
    """Raw tar sample (bytes of .json and optional .npy) -> TokenizedSample, checked against the model."""

    def __init__(self, tokenizer, prompt_format: str, max_seq_len: int, visual_tokens: int, visual_dim: int,
                 with_target: bool = True, use_images: bool = True):
        self.tokenizer, self.prompt_format, self.max_seq_len = tokenizer, prompt_format, max_seq_len
        self.feature_shape = (visual_tokens, visual_dim)
        self.with_target, self.use_images = with_target, use_images

    def __call__(self, raw: Dict[str, Any]) -> TokenizedSample:
        fields = json.loads(raw[FIELDS_MEMBER])
        if fields.get("has_image") and FEATURES_MEMBER not in raw:
            raise ValueError(f"sample {raw['__key__']}: has_image but no features (cut off in a truncated shard?)")
        features = None
        if FEATURES_MEMBER in raw and self.use_images:
            features = decode_features(raw[FEATURES_MEMBER])
            if features.shape != self.feature_shape:
                raise FeatureShapeError(f"features {features.shape}, model expects {self.feature_shape}")
            if not np.isfinite(features).all():
                raise ValueError("non-finite (NaN or inf) features")
        segments = build_segments(fields, self.prompt_format, with_target=self.with_target)
        encoded = encode_segments(self.tokenizer, segments, self.max_seq_len)
        ids, labels = encoded.input_ids, encoded.labels
        if self.with_target:
            # Nothing after the last labelled token contributes to the loss: cut it off.
            last = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=len(ids) - 1)
            ids, labels = ids[: last + 1], labels[: last + 1]
        return TokenizedSample(raw["__key__"], ids, labels, features, fields)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def collate(samples: List[TokenizedSample], pad_id: int, feature_shape, pad_to_multiple: int = 8,
            left_pad: bool = False) -> Dict[str, Any]:
    """Pad to a common length (a multiple of ``pad_to_multiple``) and stack features.

    Every batch carries an ``image_features`` tensor, zeros for text-only rows (``has_image`` False): every
    rank then runs the same modules each step, which ZeRO-3's parameter gathering requires. Training pads
    on the right, generation on the left.
    """
    length = _round_up(max(len(s.input_ids) for s in samples), pad_to_multiple)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    features = torch.zeros((batch, *feature_shape), dtype=torch.float16)
    has_image = torch.zeros(batch, dtype=torch.bool)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        span = slice(length - n, length) if left_pad else slice(0, n)
        input_ids[row, span] = torch.tensor(sample.input_ids)
        labels[row, span] = torch.tensor(sample.labels)
        attention_mask[row, span] = 1
        if sample.features is not None:
            features[row] = torch.from_numpy(sample.features.astype(np.float16, copy=False))
            has_image[row] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "image_features": features,
        "has_image": has_image,
        "keys": [s.key for s in samples],
        "fields": [s.fields for s in samples],
    }
