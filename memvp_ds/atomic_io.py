"""Atomic file writes: a temp file beside the target, flushed to disk, then renamed over it.

Readers (a resuming run, a verifying tool, a Slurm script) see the old file or the new one, never half.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Any, Iterator, TextIO


@contextmanager
def atomic_open(path: str) -> Iterator[TextIO]:
    """Open ``path`` for writing text; it appears only if the block completes."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, data: Any) -> None:
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)
