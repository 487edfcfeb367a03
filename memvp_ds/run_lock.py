"""One writer per run folder: ``<output_dir>/run.lock``, taken before a training run writes anything there.

Two runs on one folder would share its temp names (``checkpoints/latest.tmp``, ``.step-N.tmp``), mix their
checkpoints and TensorBoard events, and one of them would die mid-run. The lock file is created with
O_EXCL (atomic on local file systems and on NFSv3+) and holds who owns the folder: host, pid, Slurm job id
and start time. Its modification time is a heartbeat, renewed every HEARTBEAT_S by a daemon thread.

A second run is refused with one line naming the holder. A stale lock is taken over with a warning: its
process is gone on this host, or (another host, whose processes cannot be seen from here) its heartbeat is
older than STALE_AFTER_S. A lock left by an earlier attempt of the same Slurm job (a requeue after a
preemption or a node failure) is the job's own: Slurm never runs two attempts of one job at once.
A leaf module.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any, Dict, Optional

log = logging.getLogger("memvp_ds")
LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
"""Seconds between heartbeats (touches of the lock file)."""
STALE_AFTER_S = 600.0
"""A lock from another host whose heartbeat is older than this is stale (20 missed heartbeats: the holder's
node is gone or hung; a clock skew between nodes of minutes is tolerated)."""


class RunFolderBusy(ValueError):
    """Another live run holds the run folder."""


def _holder_text(info: Dict[str, Any]) -> str:
    job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if info.get("started") else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{job}, started {started}"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host. A zombie (ended, not yet reaped: its launcher was killed too and
    the container's init does not reap) runs no more code: not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc (not Linux): os.kill's answer stands
        return True


class RunLock:
    """The lock on one run folder; ``acquire`` takes it (or raises RunFolderBusy), ``release`` drops it."""

    def __init__(self, run_dir: str, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.time()}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.held = False

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(3):  # a stale lock removed here may be re-taken by a racing run: look again
            if self._create():
                self.held = True
                self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
            holder = self._read()
            if holder is None:
                continue  # released (or half-written) between our attempt and the read
            why_stale = self._stale(holder)
            if why_stale is None:
                raise RunFolderBusy(
                    f"train.output_dir {os.path.dirname(self.path)} is in use by another run ({_holder_text(holder)}); "
                    f"use another train.output_dir, or wait for it to end. If no such run is alive, delete {self.path}")
            log.warning("taking over the run folder lock %s from %s: %s", self.path, _holder_text(holder), why_stale)
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        raise RunFolderBusy(f"train.output_dir: could not take {self.path}: other runs keep taking it")

    def release(self) -> None:
        """Remove the lock if it is still this run's (a run that lost it to a takeover leaves it alone)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held and self._read() == self.info:
            try:
                os.remove(self.path)
            except OSError:
                pass
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> Optional[Dict[str, Any]]:
        """The holder's record; an unreadable or half-written lock gives an empty one (judged by its age)."""
        try:
            with open(self.path) as f:
                info = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _stale(self, holder: Dict[str, Any]) -> Optional[str]:
        """Why the lock ``holder`` describes is stale, or None when its run may be alive."""
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job_id") == job:
            return f"an earlier attempt of this Slurm job ({job})"
        if holder.get("host") == self.info["host"] and isinstance(holder.get("pid"), int):
            if holder["pid"] == os.getpid():
                return None  # this very process holds it (a second acquire): refuse rather than share
            return None if _alive(holder["pid"]) else f"process {holder['pid']} no longer exists on this host"
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return "it was just released"
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old (stale after {self.stale_after_s:.0f} s)"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:  # the folder went away or the lock was taken over: nothing to renew
                pass
