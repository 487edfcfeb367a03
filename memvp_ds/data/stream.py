"""Streaming data_prep shards into training and evaluation batches.

Training data order is defined by ``seed`` and the number of *streams* S = world_size x max(num_workers, 1):
stream g (rank r, loader worker w, g = r * W + w) reads every S-th shard of a seeded shard permutation, pass
after pass, through a seeded shuffle buffer. The DataLoader takes micro-batches from its workers round-robin,
so the global batch of each step is a fixed function of (seed, S): a 2-rank run and a 1-rank run with twice
the workers (and twice the accumulation) see identical batches, and a resumed run skips exactly the samples
each stream already produced. Streams never end, so every rank runs the same number of steps; epochs are
counted in steps from the manifest.

Unusable samples are skipped and counted within an error budget (``DataErrors``): systematic failures stop
the run with one error naming shard, sample key and cause, instead of a stream that never yields.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from memvp_ds.data.collate import FeatureShapeError, SampleEncoder, TokenizedSample, collate, pack

log = logging.getLogger("memvp_ds.data")


class DataStreamError(RuntimeError):
    """Samples fail systematically (or a shard disagrees with the model): the run stops with this one error."""


@dataclass(frozen=True)
class ErrorBudget:
    """How many unusable samples a stream tolerates before it calls the failure systematic."""

    max_in_row: int = 50
    """Consecutive unusable samples that stop the stream (0: never)."""
    max_fraction: float = 0.5
    """Unusable share of everything read that stops the stream, once ``10 * max_in_row`` samples were read."""

    @classmethod
    def of(cls, data) -> "ErrorBudget":
        """The budget a run's ``data`` config sets (``data.max_bad_in_row``, ``data.max_bad_fraction``)."""
        return cls(data.max_bad_in_row, data.max_bad_fraction)


_FULL_WARNINGS = 5
"""Unusable samples logged one line each; after them a summary line at every power of two."""


class DataErrors:
    """One stream's unusable samples: counted, logged without flooding, and stopped when systematic.

    Isolated bad samples (a corrupt member, non-finite features) are skipped and counted. N in a row, or
    most of what was read, means the data and the config disagree (e.g. question/answer data read with the
    multiple-choice format): retrying forever would only flood the log, so it raises DataStreamError naming
    the shard, the sample key and the cause. Features of the wrong shape stop at once (FeatureShapeError).
    """

    def __init__(self, budget: ErrorBudget = ErrorBudget()):
        self.budget = budget
        self.count = 0
        self.read = 0
        self.in_row = 0
        self.shard = "?"
        self.causes: Counter = Counter()

    def good(self) -> None:
        self.read += 1
        self.in_row = 0

    def bad(self, exn: Exception, key: str = "?") -> None:
        """Count one unusable sample; raise DataStreamError when the failures are systematic."""
        self.read += 1
        self.in_row += 1
        where = f"shard {self.shard}, sample {key}: {type(exn).__name__}: {exn}"
        if isinstance(exn, FeatureShapeError):
            raise DataStreamError(f"{where} (the shard disagrees with the model and the manifest's recipe)")
        self._count(1, type(exn).__name__, where)
        budget = self.budget
        if budget.max_in_row and self.in_row >= budget.max_in_row:
            raise DataStreamError(
                f"{self.in_row} samples in a row were unusable, the last: {where}. A systematic problem "
                f"(does data.prompt_format fit this data?); stopping (data.max_bad_in_row)")
        if budget.max_in_row and self.read >= 10 * budget.max_in_row and self.count > budget.max_fraction * self.read:
            raise DataStreamError(
                f"{self.count} of {self.read} samples read were unusable, the last: {where}; stopping "
                f"(data.max_bad_fraction={budget.max_fraction})")

    def lost(self, samples: int, reason: str) -> None:
        """Samples a shard should have held but did not (cut off): counted, outside the budget."""
        self._count(samples, "missing", f"shard {self.shard}: {reason}")

    def __call__(self, exn: Exception) -> bool:
        """webdataset handler for unreadable tar members: count and go on."""
        self.bad(exn)
        return True

    def _count(self, samples: int, cause: str, where: str) -> None:
        before = self.count
        self.count += samples
        self.causes[cause] += samples
        if before < _FULL_WARNINGS:
            log.warning("skipping unusable data (%d so far): %s", self.count, where)
        elif self.count.bit_length() > before.bit_length():  # crossed a power of two: one summary line
            log.warning("%d unusable samples skipped so far (%s); latest: %s", self.count,
                        ", ".join(f"{c}: {n}" for c, n in self.causes.most_common()), where)


def _read_shards(shards: Iterator[Dict[str, str]], expected: Dict[str, int], errors: DataErrors
                 ) -> Iterator[Dict[str, Any]]:
    """Raw samples shard by shard. A shard that ends early (truncated: tar readers stop quietly at a cut)
    is caught by comparing with the manifest's sample count, and the missing samples are counted."""
    for shard in shards:
        errors.shard = shard["url"]
        count = 0
        for sample in wds.tarfile_samples(iter([shard]), handler=errors):
            count += 1
            yield sample
        wanted = expected.get(os.path.basename(shard["url"]))
        if wanted is not None and count < wanted:
            errors.lost(wanted - count, f"{count} of {wanted} samples (truncated shard?)")


def _encode(encoder: SampleEncoder, raw: Dict[str, Any], errors: DataErrors) -> Optional[TokenizedSample]:
    """The encoded sample, or None (counted in ``errors``) when it is unusable."""
    try:
        sample = encoder(raw)
    except Exception as err:  # any malformed sample is skipped; the budget stops systematic failures
        errors.bad(err, raw.get("__key__", "?"))
        return None
    errors.good()
    return sample


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: leave SIGTERM/SIGUSR1/SIGINT to the main process.

    Slurm signals the whole process group; a worker that died of it would crash the main process (its
    SIGCHLD check) before it could save. The main process checkpoints, then shuts its workers down; a second
    SIGTERM (the main process terminating a worker that did not stop) ends the worker. Python handlers, not
    SIG_IGN, so that commands a worker starts ('pipe:' shards) keep the default dispositions.
    """
    signal.signal(signal.SIGUSR1, _ignore_signal)
    signal.signal(signal.SIGINT, _ignore_signal)
    signal.signal(signal.SIGTERM, _exit_on_second_sigterm)


def _ignore_signal(signum, frame) -> None:
    pass


_sigterms_seen = 0


def _exit_on_second_sigterm(signum, frame) -> None:
    global _sigterms_seen
    _sigterms_seen += 1
    if _sigterms_seen > 1:
        os._exit(0)


class TrainStream(IterableDataset):
    """Infinite, deterministic stream of padded or packed micro-batches for one rank (see the module
    docstring)."""

    def __init__(self, urls: List[str], encoder: SampleEncoder, micro_batch: int, collate_fn: Callable,
                 seed: int, rank: int, world_size: int, num_workers: int, shuffle_buffer: int,
                 skip_micro_batches: int = 0, expected_counts: Optional[Dict[str, int]] = None,
                 budget: ErrorBudget = ErrorBudget()):
        self.urls, self.encoder, self.micro_batch, self.collate_fn = urls, encoder, micro_batch, collate_fn
        self.budget = budget
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
        skipped = DataErrors(self.budget)
        raw = _read_shards(self._shards(stream), self.expected_counts, skipped)
        raw = _shuffled(raw, self.shuffle_buffer, rng)
        to_skip = self._skip_samples(worker)
        pending: List[TokenizedSample] = []
        reported = 0
        for sample in raw:
            if to_skip > 0:  # resume: skipped before decoding, so fast-forwarding costs only the reads
                to_skip -= 1
                continue
            encoded = _encode(self.encoder, sample, skipped)
            if encoded is None:
                continue
            pending.append(encoded)
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


@dataclass(frozen=True)
class LoaderOptions:
    """How one rank's training micro-batches are made from its shards."""

    micro_batch: int
    pad_id: int
    pad_to_multiple: int
    seed: int
    rank: int
    world_size: int
    num_workers: int
    shuffle_buffer: int
    expected_counts: Dict[str, int] = field(default_factory=dict)
    """Samples per shard name, from the manifest (a shard yielding another number is reported)."""
    budget: ErrorBudget = ErrorBudget()
    packing: bool = False
    visual_positions: int = 0
    """Positions a packed row reserves per image sample (see ``pack``)."""

    @classmethod
    def of(cls, cfg, pad_id: int, rank: int, world_size: int, expected_counts: Dict[str, int],
           visual_positions: int) -> "LoaderOptions":
        """The options a run's config (``cfg``) sets for ``rank`` of ``world_size``."""
        data = cfg.data
        return cls(cfg.train.micro_batch_size, pad_id, data.pad_to_multiple, cfg.train.seed, rank, world_size,
                   data.num_workers, data.shuffle_buffer, expected_counts, ErrorBudget.of(data), data.packing,
                   visual_positions)


def build_train_loader(urls: List[str], encoder: SampleEncoder, options: LoaderOptions,
                       skip_micro_batches: int = 0) -> DataLoader:
    """Micro-batches of ``options.micro_batch`` samples, padded or (``options.packing``) packed into rows,
    after skipping ``skip_micro_batches`` (a resumed run's position). Packing changes how the samples are laid
    out, never which samples a batch holds."""
    o = options
    if o.packing:
        collate_fn = _Pack(o.pad_id, encoder.feature_shape, encoder.max_seq_len, o.pad_to_multiple, o.visual_positions,
                           encoder.max_images)
    else:
        collate_fn = _Collate(o.pad_id, encoder.feature_shape, o.pad_to_multiple, left_pad=False,
                              max_images=encoder.max_images)
    stream = TrainStream(urls, encoder, o.micro_batch, collate_fn, o.seed, o.rank, o.world_size, o.num_workers,
                         o.shuffle_buffer, skip_micro_batches=skip_micro_batches, expected_counts=o.expected_counts,
                         budget=o.budget)
    # Its own generator: creating the iterator must not draw from the global RNG, whose state (dropout)
    # a resumed run restores exactly.
    return DataLoader(stream, batch_size=None, num_workers=o.num_workers, prefetch_factor=4 if o.num_workers else None,
                      generator=torch.Generator().manual_seed(o.seed),
                      worker_init_fn=ignore_stop_signals if o.num_workers else None)


def close_loader(batches: Iterator[Dict[str, Any]]) -> None:
    """Stop a DataLoader iterator's workers now, on every exit path of the loop that reads it.

    Waiting for garbage collection is not enough: an exception raised through the iterator keeps it alive
    in its traceback, and at interpreter exit multiprocessing would join workers that were never told to
    stop. (``_shutdown_workers`` is the iterator's own shutdown, the one its ``__del__`` runs.)
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


@dataclass
class _Collate:
    """Picklable collate for loader workers."""

    pad_id: int
    feature_shape: tuple
    pad_to_multiple: int
    left_pad: bool
    max_images: int = 1

    def __call__(self, samples: List[TokenizedSample]) -> Dict[str, Any]:
        return collate(samples, self.pad_id, self.feature_shape, self.pad_to_multiple, self.left_pad, self.max_images)


@dataclass
class _Pack:
    """Picklable packing collate for loader workers."""

    pad_id: int
    feature_shape: tuple
    max_seq_len: int
    pad_to_multiple: int
    visual_positions: int
    max_images: int = 1

    def __call__(self, samples: List[TokenizedSample]) -> Dict[str, Any]:
        return pack(samples, self.pad_id, self.feature_shape, self.max_seq_len, self.pad_to_multiple,
                    self.visual_positions, self.max_images)


def iterate_eval_batches(urls: List[str], encoder: SampleEncoder, batch_size: int, pad_id: int, rank: int,
                         world_size: int, max_samples: Optional[int] = None, left_pad: bool = True,
                         budget: ErrorBudget = ErrorBudget()) -> Iterator[Dict[str, Any]]:
    """Every sample of the split exactly once, in shard order, rank r taking samples i % world == r.

    Every rank yields the same number of batches (the last ones possibly shorter or empty-padded with a
    copy flagged ``valid=False``), so collective ops inside the model (ZeRO-3 gathers) never wait forever.
    Unusable samples are skipped within ``budget``; a split with none usable raises DataStreamError.
    """
    skipped = DataErrors(budget)
    collate_fn = _Collate(pad_id, encoder.feature_shape, 8, left_pad, encoder.max_images)
    samples: List[TokenizedSample] = []
    filler: Optional[TokenizedSample] = None
    total = 0
    for index, raw in enumerate(_read_shards(iter({"url": u} for u in urls), {}, skipped)):
        if max_samples is not None and index >= max_samples:
            break
        total += 1
        if index % world_size != rank and filler is not None:
            continue
        encoded = _encode(encoder, raw, skipped)
        if encoded is None:
            continue
        filler = filler or encoded
        if index % world_size == rank:
            samples.append(encoded)
    if filler is None and total:
        raise DataStreamError(f"none of the {total} samples of {urls[0]}... is usable ({skipped.count} skipped)")
    per_rank = -(-total // world_size)
    for start in range(0, per_rank, batch_size):
        chunk = samples[start : start + batch_size]
        wanted = min(batch_size, per_rank - start)
        valid = [True] * len(chunk) + [False] * (wanted - len(chunk))
        batch = collate_fn(chunk + [filler] * (wanted - len(chunk)))
        batch["valid"] = torch.tensor(valid)
        yield batch
