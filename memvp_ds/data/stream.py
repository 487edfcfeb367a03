"""Streaming data_prep shards into training and evaluation batches.

Training data order is defined by ``seed`` and the number of *streams* S = world_size x max(num_workers, 1):
stream g (rank r, loader worker w, g = r * W + w) reads every S-th shard of a seeded shard permutation, pass
after pass, through a seeded shuffle buffer. The DataLoader takes micro-batches from its workers round-robin,
so the global batch of each step is a fixed function of (seed, S): a 2-rank run and a 1-rank run with twice
the workers (and twice the accumulation) see identical batches, and a resumed run skips exactly the samples
each stream already produced. Streams never end, so every rank runs the same number of steps; epochs are
counted in steps from the manifest.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from memvp_ds.data.collate import SampleEncoder, TokenizedSample, collate, pack

log = logging.getLogger("memvp_ds.data")


class _SkipCounter:
    """A webdataset handler that counts and logs unreadable shards and samples instead of stopping."""

    def __init__(self):
        self.count = 0

    def __call__(self, exn: Exception, samples: int = 1) -> bool:
        self.count += samples
        log.warning("skipping unreadable data (%d samples so far): %s: %s", self.count, type(exn).__name__, exn)
        return True


def _read_shards(shards: Iterator[Dict[str, str]], expected: Dict[str, int], skipped: _SkipCounter
                 ) -> Iterator[Dict[str, Any]]:
    """Raw samples shard by shard. A shard that ends early (truncated: tar readers stop quietly at a cut)
    is caught by comparing with the manifest's sample count, and the missing samples are counted."""
    for shard in shards:
        count = 0
        for sample in wds.tarfile_samples(iter([shard]), handler=skipped):
            count += 1
            yield sample
        wanted = expected.get(os.path.basename(shard["url"]))
        if wanted is not None and count < wanted:
            skipped(ValueError(f"{shard['url']}: {count} of {wanted} samples (truncated shard?)"), wanted - count)


class TrainStream(IterableDataset):
    """Infinite, deterministic stream of padded or packed micro-batches for one rank (see the module
    docstring)."""

    def __init__(self, urls: List[str], encoder: SampleEncoder, micro_batch: int, collate_fn: Callable,
                 seed: int, rank: int, world_size: int, num_workers: int, shuffle_buffer: int,
                 skip_micro_batches: int = 0, expected_counts: Optional[Dict[str, int]] = None):
        self.urls, self.encoder, self.micro_batch, self.collate_fn = urls, encoder, micro_batch, collate_fn
        self.expected_counts = expected_counts or {}
        self.seed, self.rank, self.shuffle_buffer = seed, rank, shuffle_buffer
        self.workers = max(num_workers, 1)
        self.streams = world_size * self.workers
        self.skip_micro_batches = skip_micro_batches
        if len(urls) < self.streams:
            log.warning(
                "%d shards for %d streams (ranks x workers): streams share shards, so samples repeat within a "
                "pass; write more, smaller shards for this scale", len(urls), self.streams,
            )

    def _skip_samples(self, worker: int) -> int:
        """Samples this worker's stream produced for the micro-batches the rank already consumed.

        The DataLoader takes batch b from worker b % W, so worker w made ceil((consumed - w) / W) of them.
        """
        consumed = self.skip_micro_batches
        mine = (consumed - worker + self.workers - 1) // self.workers if consumed > worker else 0
        return mine * self.micro_batch

    def _shards(self, stream: int) -> Iterator[Dict[str, str]]:
        epoch = 0
        while True:
            order = list(self.urls)
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            mine = order[stream :: self.streams] or [order[(stream + epoch * self.streams) % len(order)]]
            for url in mine:
                yield {"url": url}
            epoch += 1

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = self.rank * self.workers + worker
        rng = random.Random(self.seed * 7919 + stream)
        skipped = _SkipCounter()
        raw = _read_shards(self._shards(stream), self.expected_counts, skipped)
        raw = _shuffled(raw, self.shuffle_buffer, rng)
        to_skip = self._skip_samples(worker)
        pending: List[TokenizedSample] = []
        reported = 0
        for sample in raw:
            if to_skip > 0:  # resume: skipped before decoding, so fast-forwarding costs only the reads
                to_skip -= 1
                continue
            try:
                pending.append(self.encoder(sample))
            except Exception as err:
                skipped(err)
                continue
            if len(pending) == self.micro_batch:
                batch = self.collate_fn(pending)
                batch["skipped_samples"] = skipped.count - reported
                reported = skipped.count
                pending = []
                yield batch


def _shuffled(samples: Iterator[Dict[str, Any]], buffer_size: int, rng: random.Random) -> Iterator[Dict[str, Any]]:
    """Reservoir shuffle with a seeded RNG (deterministic, unlike webdataset's default per-process seed)."""
    buffer: List[Dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(len(buffer))
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def build_train_loader(urls: List[str], encoder: SampleEncoder, micro_batch: int, pad_id: int, pad_to_multiple: int,
                       seed: int, rank: int, world_size: int, num_workers: int, shuffle_buffer: int,
                       skip_micro_batches: int, expected_counts: Dict[str, int], packing: bool = False,
                       visual_positions: int = 0) -> DataLoader:
    """Micro-batches of ``micro_batch`` samples, padded or (``packing``) packed into rows; see ``pack`` for
    ``visual_positions``. Packing changes how the samples are laid out, never which samples a batch holds."""
    if packing:
        collate_fn = _Pack(pad_id, encoder.feature_shape, encoder.max_seq_len, pad_to_multiple, visual_positions)
    else:
        collate_fn = _Collate(pad_id, encoder.feature_shape, pad_to_multiple, left_pad=False)
    stream = TrainStream(urls, encoder, micro_batch, collate_fn, seed, rank, world_size, num_workers, shuffle_buffer,
                         skip_micro_batches=skip_micro_batches, expected_counts=expected_counts)
    # Its own generator: creating the iterator must not draw from the global RNG, whose state (dropout)
    # a resumed run restores exactly.
    return DataLoader(stream, batch_size=None, num_workers=num_workers, prefetch_factor=4 if num_workers else None,
                      generator=torch.Generator().manual_seed(seed))


@dataclass
class _Collate:
    """Picklable collate for loader workers."""

    pad_id: int
    feature_shape: tuple
    pad_to_multiple: int
    left_pad: bool

    def __call__(self, samples: List[TokenizedSample]) -> Dict[str, Any]:
        return collate(samples, self.pad_id, self.feature_shape, self.pad_to_multiple, self.left_pad)


@dataclass
class _Pack:
    """Picklable packing collate for loader workers."""

    pad_id: int
    feature_shape: tuple
    max_seq_len: int
    pad_to_multiple: int
    visual_positions: int

    def __call__(self, samples: List[TokenizedSample]) -> Dict[str, Any]:
        return pack(samples, self.pad_id, self.feature_shape, self.max_seq_len, self.pad_to_multiple,
                    self.visual_positions)


def iterate_eval_batches(urls: List[str], encoder: SampleEncoder, batch_size: int, pad_id: int, rank: int,
                         world_size: int, max_samples: Optional[int] = None, left_pad: bool = True
                         ) -> Iterator[Dict[str, Any]]:
    """Every sample of the split exactly once, in shard order, rank r taking samples i % world == r.

    Every rank yields the same number of batches (the last ones possibly shorter or empty-padded with a
    copy flagged ``valid=False``), so collective ops inside the model (ZeRO-3 gathers) never wait forever.
    """
    skipped = _SkipCounter()
    collate_fn = _Collate(pad_id, encoder.feature_shape, 8, left_pad)
    samples: List[TokenizedSample] = []
    filler: Optional[TokenizedSample] = None
    total = 0
    for index, raw in enumerate(_read_shards(iter({"url": u} for u in urls), {}, skipped)):
        if max_samples is not None and index >= max_samples:
            break
        total += 1
        if index % world_size != rank and filler is not None:
            continue
        try:
            encoded = encoder(raw)
        except Exception as err:
            skipped(err)
            continue
        filler = filler or encoded
        if index % world_size == rank:
            samples.append(encoded)
    per_rank = -(-total // world_size)
    for start in range(0, per_rank, batch_size):
        chunk = samples[start : start + batch_size]
        wanted = min(batch_size, per_rank - start)
        valid = [True] * len(chunk) + [False] * (wanted - len(chunk))
        batch = collate_fn(chunk + [filler] * (wanted - len(chunk)))
        batch["valid"] = torch.tensor(valid)
        yield batch
