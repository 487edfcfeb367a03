"""Stop signals from the first line of an entry point: SIGTERM and SIGUSR1 (Slurm's cancel, time-out and
pre-kill warning) and SIGINT (Ctrl-C, which a terminal sends to the whole process group).

One process-wide record of the first stop signal. Where a stop can be honoured at once (start-up: imports,
model load, engine build; a single process waiting for data) the handler raises ``StopRequested`` there;
elsewhere (inside a training step, a checkpoint write) it only records the signal and the training loop
stops at the next step boundary, where the ranks agree on it. A second SIGINT aborts at once with
KeyboardInterrupt, without saving: the user asked twice. A leaf module.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Tuple

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
"""Exit code of a run stopped by Ctrl-C (128 + SIGINT), as a shell reports an interrupted command."""


class StopRequested(Exception):
    """A stop signal arrived where the process can stop at once; ``signal_name`` says which."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class _StopSignals:
    def __init__(self) -> None:
        self.raised: Optional[str] = None
        self._immediate = 0  # depth of ``immediate()`` blocks: >0 where the handler may raise
        self._previous: Dict[int, Any] = {}

    def install(self) -> "_StopSignals":
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, self._handle)
            if previous != self._handle:
                self._previous[sig] = previous
        return self

    def restore(self) -> None:
        """Put back the handlers from before ``install`` and forget any signal (a process that calls an entry
        point twice, such as a test, starts afresh)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self.raised = None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.raised == "SIGINT":
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt("second Ctrl-C: aborted without saving")
        self.raised = self.raised or name
        if self._immediate:
            raise StopRequested(self.raised)

    def release(self) -> None:
        """Give the signals back (a command that turned out not to train: --dry-run, --print-config),
        delivering again one that came meanwhile, now to the previous handler."""
        pending = self.raised
        self.restore()
        if pending:
            signal.raise_signal(signal.Signals[pending])

    @contextmanager
    def immediate(self) -> Iterator[None]:
        """A block a stop signal ends at once (StopRequested), also one that came before it."""
        if self.raised:
            raise StopRequested(self.raised)
        self._immediate += 1
        try:
            yield
        finally:
            self._immediate -= 1


STOP = _StopSignals()
"""The process's stop-signal record (signal handlers are per process)."""


def install() -> _StopSignals:
    """Take over the stop signals; call first thing in an entry point."""
    return STOP.install()


def outcome(signal_name: Optional[str]) -> Tuple[str, int]:
    """(run status, exit code) of a run stopped by ``signal_name``: Ctrl-C "interrupted" (130), a scheduler's
    signal "preempted" (0, so that the Slurm script requeues the job)."""
    if signal_name == "SIGINT":
        return "interrupted", INTERRUPTED_EXIT_CODE
    return "preempted", 0
