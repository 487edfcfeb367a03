"""Progress of long loops: a tqdm bar on a terminal, plain periodic log lines elsewhere (Slurm logs, pipes),
where tqdm's carriage-return redraws would glue lines together. A leaf module."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Optional

log = logging.getLogger("memvp_ds.progress")
LINE_EVERY_S = float(os.environ.get("MEMVP_PROGRESS_SECONDS", "60"))
"""Seconds between plain progress lines off a terminal (MEMVP_PROGRESS_SECONDS; 0: a line per update)."""


class _Lines:
    """tqdm's update/set_postfix/close interface, writing ``desc: n/total unit (postfix)`` log lines."""

    def __init__(self, total: Optional[int], desc: str, unit: str, initial: int, every_s: float):
        self.total, self.desc, self.unit, self.n, self.every_s = total, desc, unit, initial, every_s
        self.postfix = ""
        self.last = time.monotonic()
        self.printed_at = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every_s:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.n != self.printed_at:
            self._line()

    def _line(self) -> None:
        total = f"/{self.total}" if self.total is not None else ""
        log.info("%s: %d%s %s%s", self.desc, self.n, total, self.unit, f" ({self.postfix})" if self.postfix else "")
        self.last, self.printed_at = time.monotonic(), self.n

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent(_Lines):
    def _line(self) -> None:
        pass


def progress(total: Optional[int] = None, desc: str = "", unit: str = "it", initial: int = 0, enabled: bool = True,
             every_s: Optional[float] = None):
    """A progress bar for ``total`` units: tqdm when stderr is a terminal, else a log line every ``every_s``
    seconds (default LINE_EVERY_S) and one at the end; nothing when not ``enabled`` (ranks other than 0)."""
    if not enabled:
        return _Silent(total, desc, unit, initial, 0.0)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit)
    return _Lines(total, desc, unit, initial, LINE_EVERY_S if every_s is None else every_s)
