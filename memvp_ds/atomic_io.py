"""Atomic, durable file writes: a temp file beside the target, flushed to disk, then renamed over it, and the
folder flushed so the rename itself survives a node crash.

Readers (a resuming run, a verifying tool, a Slurm script) see the old file or the new one, never half.
Files get the permissions the process umask gives (as ``open`` would), also the safetensors files whose
writer creates them 0600, so teammates on a shared cluster can read a run's outputs. A full disk is
reported with the file and the free space it needed, and the partial temp file is removed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, TextIO

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""No space on the device, quota exceeded, or the process's file-size limit (ulimit -f)."""


class DiskFullError(OSError):
    """A write failed for lack of space; the message names the file and the space it needed."""

    def __str__(self) -> str:
        return self.strerror


def process_umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask would set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str) -> None:
    """Give ``path`` the mode ``open`` would have created it with (0666 less the umask)."""
    os.chmod(path, 0o666 & ~process_umask())


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (a rename into it, a new file) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename is then as durable as they make it
        pass
    finally:
        os.close(fd)


def _folder(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def disk_full(path: str, needed: Optional[int], err: BaseException) -> DiskFullError:
    """The one-line error for a write to ``path`` that ran out of space (``needed``: bytes, if known)."""
    try:
        free = shutil.disk_usage(_folder(path)).free
    except OSError:
        free = None
    parts = [f"cannot write {path}: no space left ({err})"]
    if needed is not None:
        parts.append(f"it needs about {_size(needed)}")
    if free is not None:
        parts.append(f"{_size(free)} free on its file system")
    code = getattr(err, "errno", None) or errno.ENOSPC
    return DiskFullError(code, "; ".join(parts) + ". Free space (or raise the quota) and rerun")


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in DISK_FULL_ERRNOS
    # safetensors' Rust writer raises its own error type carrying the OS message.
    text = str(err)
    return any(os.strerror(code) in text for code in DISK_FULL_ERRNOS)


@contextmanager
def _replacing(path: str, needed: Optional[int] = None) -> Iterator[str]:
    """A temp path beside ``path`` for the block to write and flush; renamed over ``path`` (then the folder is
    flushed) once the block completes. On failure the temp file is removed and ``path`` is left as it was; a
    full disk raises DiskFullError naming ``path``."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(err, Exception) and _is_disk_full(err):
            raise disk_full(path, needed, err) from None
        raise
    fsync_dir(_folder(path))


def write_durably(path: str, write: Callable[[str], None], needed: Optional[int] = None) -> None:
    """Call ``write(tmp)`` to create a temp file beside ``path``, give it the umask's mode, flush it to disk,
    rename it over ``path`` and flush the folder. On failure the temp file is removed and ``path`` is left
    as it was; a full disk raises DiskFullError naming ``path``."""
    with _replacing(path, needed) as tmp:
        write(tmp)
        apply_umask(tmp)
        fsync_file(tmp)


def write_safetensors(tensors: Dict[str, Any], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """safetensors' ``save_file``, atomic and durable, with the umask's permissions."""
    from safetensors.torch import save_file

    needed = sum(t.numel() * t.element_size() for t in tensors.values()) + sum(map(len, (metadata or {}).values()))
    write_durably(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), needed)


@contextmanager
def atomic_open(path: str) -> Iterator[TextIO]:
    """Open ``path`` for writing text; it appears only if the block completes (then durably)."""
    with _replacing(path) as tmp, open(tmp, "w") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str, data: Any) -> None:
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)


def write_text_atomic(path: str, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)
