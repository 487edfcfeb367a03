"""A training run as memvp-train starts it: one writer per run folder, no orphan ranks, a clean stop at any
time, and a status.json that never claims success for a run that ended in an error.

Order, after the config is loaded (nothing written yet): every rank watches its launcher
(distributed.exit_with_launcher); the process group forms; rank 0 takes the run folder's lock
(memvp_ds.run_lock) and every rank stops if it is refused. Up to the end of the model build this is a
start-up that a stop signal ends at once (status "preempted", or "interrupted" for Ctrl-C: nothing to save
yet); the training loop honours one at a step boundary, after saving. An exception ends the run with
status "failed" and its one-line reason before it propagates.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Dict, Optional

from memvp_ds.atomic_io import write_json_atomic
from memvp_ds.cli import error_line
from memvp_ds.config import Config
from memvp_ds.distributed import DistInfo, all_gather_objects, destroy, exit_with_launcher, init_distributed
from memvp_ds.engine.trainer import Trainer
from memvp_ds.run_folder import RunFolder, check_writable
from memvp_ds.run_lock import RunLock
from memvp_ds.stop_signals import INTERRUPTED_EXIT_CODE, STOP, StopRequested, outcome

log = logging.getLogger("memvp_ds")
EXIT_CODES = {"complete": 0, "preempted": 0, "interrupted": INTERRUPTED_EXIT_CODE}
"""Exit code of a run by its final status; any other status (diverged) exits 1."""


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def write_run_status(out: str, status: str, reason: Optional[str] = None, **fields: Any) -> None:
    """status.json with ``status`` (and ``reason``). If it cannot be written (a full disk), the old one is
    removed rather than left claiming an earlier outcome; the error is logged, not raised over the
    original one."""
    path = RunFolder(out).status
    data: Dict[str, Any] = {"status": status, "step": None, "total_steps": None, **fields}
    if reason is not None:
        data["reason"] = reason
    try:
        write_json_atomic(path, data)
    except OSError as err:
        log.error("could not write %s (%s); removing the old one", path, err)
        try:
            os.remove(path)
        except OSError:
            pass


def _hold_run_folder(out: str, dist_info: DistInfo) -> Optional[RunLock]:
    """Rank 0 takes the run folder's lock; every rank raises its refusal (one line, printed by rank 0), so a
    refused job ends on all ranks alike."""
    lock, refusal = None, None
    if dist_info.is_main:
        try:
            check_writable(out, "train.output_dir")  # a folder that cannot hold the lock is named as the option
            lock = RunLock(out).acquire()
        except ValueError as err:  # ConfigError, RunFolderBusy
            refusal = err
    refusal = all_gather_objects(refusal)[0]
    if refusal is not None:
        raise refusal
    return lock


def _lock_to_report(out: str) -> Optional[RunLock]:
    """The lock for a status written before the run took it (a stop during start-up), or None if refused."""
    try:
        return RunLock(out).acquire() if _is_rank_zero() else None
    except (OSError, ValueError):
        return None


def run_training(cfg: Config) -> int:
    """Train ``cfg`` as one rank of a job (or a single process); returns the process exit code."""
    out = cfg.train.output_dir
    exit_with_launcher()
    lock: Optional[RunLock] = None
    try:
        try:
            with STOP.immediate():  # start-up: a stop signal ends it here, cleanly
                dist_info = init_distributed()
                node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
                print(f"memvp_ds: rank {dist_info.rank}/{dist_info.world_size} on node {node}", flush=True)
                if not dist_info.is_main:
                    logging.getLogger().setLevel(logging.WARNING)
                lock = _hold_run_folder(out, dist_info)  # before anything is written there
                trainer = Trainer(cfg, dist_info)
            result = trainer.train()
        except StopRequested as stop:
            status, code = outcome(stop.signal_name)
            log.warning("stop signal (%s) during start-up, before the first step: nothing to save; status %s",
                        stop.signal_name, status)
            lock = lock or _lock_to_report(out)
            if lock:
                write_run_status(out, status, reason=f"{stop.signal_name} during start-up, before the first step")
            return code
        except KeyboardInterrupt:  # a second Ctrl-C
            if lock:
                write_run_status(out, "interrupted", reason="a second Ctrl-C aborted the run without saving")
            raise
        except Exception as err:
            if lock:
                write_run_status(out, "failed", reason=error_line(err)[len("error: "):])
            raise
        destroy()
        return EXIT_CODES.get(result["status"], 1)
    finally:
        if lock:
            lock.release()
