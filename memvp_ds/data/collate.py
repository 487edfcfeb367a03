"""Turning stored samples into model inputs: tokenisation (in loader workers) and padding into batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from memvp_ds.data.prompts import IGNORE_INDEX, IMAGE_TAG, encode_prompt
from memvp_ds.data.shard_format import (FEATURES_MEMBER, FIELDS_MEMBER, IMAGE_MEMBER, decode_features, decode_image,
                                        features_member, image_count, image_member)


class FeatureShapeError(ValueError):
    """Stored features whose shape is not the model's: the shard disagrees with its manifest or the model,
    so every image sample of it would fail; never skipped sample by sample."""


@dataclass
class TokenizedSample:
    key: str
    input_ids: List[int]
    labels: List[int]
    features: Optional[np.ndarray]
    """(N, C) features ((n x N, C): the n images of a multi-image sample in order), or (3, S, S) uint8 pixels
    when the encoder reads images ((n x 3, S, S) likewise)."""
    fields: Dict[str, Any]


class SampleEncoder:
    """Raw tar sample (bytes of .json and optional .npy / .png) -> TokenizedSample, checked against the model.

    ``with_target=False`` encodes the evaluation prompt; ``use_caption`` puts the sample's caption in a
    ScienceQA context (the official evaluation does, training does not). With ``image_size`` set (an online
    vision tower) the sample's stored image is read as (3, S, S) uint8 pixels instead of its features. A sample
    may have up to ``max_images`` images (their features concatenated, each checked).

    ``visual_positions``: the positions a strategy puts in the sequence per image (its ``prefix_positions``).
    With several images per sample (``max_images`` > 1) they go in the text, at each image's ``<image>`` tag
    (all of a sample's images in front, in order, when its text has no tags): ``visual_marker`` ids that the
    strategy replaces by the image's tokens; ``max_positions`` counts them. With one image the strategy puts
    them in front itself."""

    def __init__(self, tokenizer, prompt_format: str, max_seq_len: int, visual_tokens: int, visual_dim: int,
                 with_target: bool = True, use_images: bool = True, use_caption: bool = False,
                 image_size: Optional[int] = None, max_images: int = 1, visual_positions: int = 0):
        self.tokenizer, self.prompt_format, self.max_seq_len = tokenizer, prompt_format, max_seq_len
        self.max_images = max_images
        self.positions_per_image = visual_positions if max_images > 1 else 0
        self.member = FEATURES_MEMBER if image_size is None else IMAGE_MEMBER
        self.feature_shape = (visual_tokens, visual_dim) if image_size is None else (3, image_size, image_size)
        self.with_target, self.use_images, self.use_caption = with_target, use_images, use_caption

    def _decode(self, data: bytes) -> np.ndarray:
        if self.member == FEATURES_MEMBER:
            return decode_features(data)
        return np.ascontiguousarray(decode_image(data).transpose(2, 0, 1))

    def __call__(self, raw: Dict[str, Any]) -> TokenizedSample:
        fields = json.loads(raw[FIELDS_MEMBER])
        # A hand-written shard may leave has_image out: a stored member still counts as an image.
        count = image_count(fields) or int(self.member in raw)
        if count > self.max_images:
            raise ValueError(f"sample {raw['__key__']}: {count} images, data.max_images is {self.max_images}")
        member_of = features_member if self.member == FEATURES_MEMBER else image_member
        members = [member_of(i) for i in range(count)]
        missing = [m for m in members if m not in raw] if fields.get("has_image") else []
        if missing:
            raise ValueError(f"sample {raw['__key__']}: has_image but no .{missing[0]} member (a truncated shard, or "
                             "shards written with another --store)")
        features = None
        if count and self.use_images:
            arrays = [self._decode(raw[member]) for member in members]
            for member, array in zip(members, arrays):
                if array.shape != self.feature_shape:
                    raise FeatureShapeError(f".{member} {array.shape}, model expects {self.feature_shape}")
                if not np.isfinite(array).all():
                    raise ValueError(f"non-finite (NaN or inf) features in .{member}")
            features = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        encoded = encode_prompt(self.tokenizer, fields, self.prompt_format, self.max_seq_len, self.with_target,
                                self.use_caption)
        ids, labels = encoded.input_ids, encoded.labels
        if self.with_target:
            if all(label == IGNORE_INDEX for label in labels):  # nothing to learn from: unusable, counted
                raise ValueError(f"no answer token is left after truncation to data.max_seq_len={self.max_seq_len}")
            # Nothing after the last labelled token contributes to the loss: cut it off.
            last = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=len(ids) - 1)
            ids, labels = ids[: last + 1], labels[: last + 1]
        if self.positions_per_image and features is not None:
            tags = encoded.image_positions
            if tags and len(tags) != count:
                raise ValueError(f"sample {raw['__key__']}: {count} images but {len(tags)} {IMAGE_TAG} tags in its "
                                 "text")
            before, per_image = tags or [0] * count, self.positions_per_image
            ids = with_visual_positions(ids, before, per_image)
            labels = insert_per_image(labels, before, per_image, lambda image, t: IGNORE_INDEX)
        return TokenizedSample(raw["__key__"], ids, labels, features, fields)

    @property
    def max_positions(self) -> int:
        """The most positions a sample takes: its text and the visual positions placed in it."""
        return self.max_seq_len + self.max_images * self.positions_per_image


def visual_marker(row: int) -> int:
    """The input id of the position that takes row ``row`` of its sample's visual tokens (image j's token t is
    row j x N + t); the strategies read it back (memvp_ds/model/strategies/base.py: ``place_in_text``)."""
    return -1 - row


def with_visual_positions(ids: List[int], before: List[int], per_image: int) -> List[int]:
    """``ids`` with image j's ``per_image`` positions (``visual_marker`` ids) in front of ``ids[before[j]]``."""
    return insert_per_image(ids, before, per_image, lambda image, t: visual_marker(image * per_image + t))


def insert_per_image(values: List[int], before: List[int], per_image: int, item: Callable[[int, int], int]
                     ) -> List[int]:
    """``values`` with ``item(j, t)`` for t < ``per_image`` in front of ``values[before[j]]``, for each image j
    (``before`` in order; an index past the end, a tag after the last answer token, means the end)."""
    out, done = [], 0
    for image, position in enumerate(before):
        position = max(done, min(position, len(values)))
        out += values[done:position] + [item(image, t) for t in range(per_image)]
        done = position
    return out + values[done:]


def build_encoder(cfg, tokenizer, with_target: bool = True, use_caption: bool = False, visual_positions: int = 0
                  ) -> SampleEncoder:
    """The run's encoder (``cfg``: the run config): stored features, or stored images when the model runs
    its vision tower online (``model.vision.online``). ``visual_positions``: the strategy's
    ``prefix_positions`` (see SampleEncoder)."""
    vision = cfg.model.vision
    return SampleEncoder(tokenizer, cfg.data.prompt_format, cfg.data.max_seq_len, cfg.model.visual_tokens,
                         cfg.model.visual_dim, with_target, cfg.data.use_images, use_caption,
                         image_size=vision.recipe.image_size if vision.online else None,
                         max_images=cfg.data.max_images, visual_positions=visual_positions)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _visual_key(feature_shape) -> str:
    """The batch entry of the visual input: ``images`` for (3, S, S) pixels, else ``image_features``."""
    return "images" if len(feature_shape) == 3 else "image_features"


def _stack_features(samples: List[TokenizedSample], feature_shape, max_images: int = 1):
    """(B, N, C) fp16 features, or (B, 3, S, S) uint8 pixels for an online vision tower, zeros for text-only
    samples, and the (B,) ``has_image`` flags. With ``max_images`` k > 1, (B, k x N, C) features (or (B, k x 3,
    S, S) pixels), a sample's n images in the first n slots, and (B, k) ``has_image`` flags per slot."""
    pixels = _visual_key(feature_shape) == "images"
    slots = (feature_shape[0] * max_images, *feature_shape[1:])
    features = torch.zeros((len(samples), *slots), dtype=torch.uint8 if pixels else torch.float16)
    has_image = torch.zeros((len(samples), max_images) if max_images > 1 else len(samples), dtype=torch.bool)
    for row, sample in enumerate(samples):
        if sample.features is not None:
            rows = sample.features.shape[0]
            features[row, :rows] = torch.from_numpy(
                sample.features if pixels else sample.features.astype(np.float16, copy=False))
            if max_images > 1:
                has_image[row, : rows // feature_shape[0]] = True
            else:
                has_image[row] = True
    return features, has_image


def _batch(samples: List[TokenizedSample], feature_shape, max_images: int = 1, **tensors: torch.Tensor
           ) -> Dict[str, Any]:
    """The token ``tensors`` plus what every batch carries per sample: visual input, ``has_image``, keys, fields."""
    features, has_image = _stack_features(samples, feature_shape, max_images)
    return {**tensors, _visual_key(feature_shape): features, "has_image": has_image,
            "keys": [s.key for s in samples], "fields": [s.fields for s in samples]}


def collate(samples: List[TokenizedSample], pad_id: int, feature_shape, pad_to_multiple: int = 8,
            left_pad: bool = False, max_images: int = 1) -> Dict[str, Any]:
    """Pad to a common length (a multiple of ``pad_to_multiple``) and stack features (``max_images`` image
    slots per sample: see ``_stack_features``).

    Every batch carries an ``image_features`` tensor (fp16), or for (3, S, S) pixel shapes an ``images``
    tensor (uint8), zeros for text-only rows (``has_image`` False): every rank then runs the same modules
    each step, which ZeRO-3's parameter gathering requires. Training pads on the right, generation on the left.
    """
    length = _round_up(max(len(s.input_ids) for s in samples), pad_to_multiple)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        span = slice(length - n, length) if left_pad else slice(0, n)
        input_ids[row, span] = torch.tensor(sample.input_ids)
        labels[row, span] = torch.tensor(sample.labels)
        attention_mask[row, span] = 1
    return _batch(samples, feature_shape, max_images, input_ids=input_ids, attention_mask=attention_mask,
                  labels=labels)


def pack_rows(lengths: List[int], capacity: int) -> List[List[int]]:
    """Sample indices per row: first-fit over the samples from longest to shortest (ties: earlier first), so
    the rows are as few as this greedy rule finds and the result depends on the lengths alone."""
    rows: List[List[int]] = []
    free: List[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[index] > capacity:
            raise ValueError(f"a sample of {lengths[index]} positions does not fit a packed row of {capacity}")
        row = next((r for r, room in enumerate(free) if room >= lengths[index]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= lengths[index]
    return rows


def pack(samples: List[TokenizedSample], pad_id: int, feature_shape, max_seq_len: int, pad_to_multiple: int = 8,
         visual_positions: int = 0, max_images: int = 1) -> Dict[str, Any]:
    """Sequence packing: all ``samples`` (one micro-batch) concatenated into as few rows as fit, padded on
    the right to a common length (a multiple of ``pad_to_multiple``).

    A row holds up to ``max_seq_len + visual_positions`` positions: the longest single sample. Every sample
    with an image starts with ``visual_positions`` reserved positions (pad token, no label, attention mask 0)
    where the strategy puts what it prepends (``VisualStrategy.prefix_positions``: an input-space strategy's
    visual tokens, DVP's token slot; 0 for the others). With ``max_images`` > 1 the samples carry them in their
    text instead, ``visual_positions`` per image (``SampleEncoder``), and a row holds up to ``max_seq_len +
    max_images x visual_positions``. Besides the
    keys of ``collate`` (``attention_mask`` is 1 on text tokens; features and ``has_image`` per sample, in
    ``samples`` order), ``segment_ids`` (R, L) gives each position's sample index, -1 on padding: the model
    keeps attention, positions and visual terms per sample with it.
    """
    front = visual_positions if max_images == 1 else 0
    lengths = [len(s.input_ids) + (front if s.features is not None else 0) for s in samples]
    rows = pack_rows(lengths, max_seq_len + visual_positions * max_images)
    length = _round_up(max(sum(lengths[i] for i in row) for row in rows), pad_to_multiple)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    segment_ids = torch.full((len(rows), length), -1, dtype=torch.long)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            sample = samples[index]
            segment_ids[row, start : start + lengths[index]] = index
            text = slice(start + lengths[index] - len(sample.input_ids), start + lengths[index])
            input_ids[row, text] = torch.tensor(sample.input_ids)
            labels[row, text] = torch.tensor(sample.labels)
            attention_mask[row, text] = 1
            start += lengths[index]
    return _batch(samples, feature_shape, max_images, input_ids=input_ids, attention_mask=attention_mask,
                  labels=labels, segment_ids=segment_ids)
