"""A clean stop on SIGTERM / SIGINT: training finishes its optimizer step, writes a resumable
checkpoint and exits, instead of dying mid-step with only the last periodic checkpoint.

The first signal only sets a flag that the training loop reads after each optimizer step; a second
one restores the default behaviour (SIGINT raises KeyboardInterrupt, SIGTERM ends the process), so a
user can always force the exit.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from lorakit.errors import LorakitError


class TrainingStopped(LorakitError):
    """Training was asked to stop (SIGTERM / SIGINT) and left a checkpoint to resume from."""

    exit_code = 130  # what shells report for an interrupted command


class StopRequest:
    """Catches SIGTERM and SIGINT while active (a context manager) and remembers that one came.

    Outside the main thread, where Python cannot install signal handlers, it does nothing and
    :attr:`requested` stays False.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None  # the name of the signal that asked to stop
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested:  # the second signal: stop now, the default way
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
