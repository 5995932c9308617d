"""Trainings on one machine share its CPU cores instead of each taking all of them.

torch starts as many threads as there are cores. Two trainings started side by side (two
``lorakit train`` in two terminals, ``lorakit tune`` with several workers, "Start" twice in the UI)
then run twice as many threads as cores, and each step takes far longer than a fair share (measured
3x on 2 cores: bench/two_runs.py). So each training on CPU that does not set ``train.num_threads``
registers itself in a folder of this user's live trainings (``$TMPDIR/lorakit-trainings-<uid>/<pid>.json``)
and uses ``cores // trainings`` threads, re-counted every few seconds between steps: when one
ends, the others take its cores back. Each change is logged. A training that sets
``train.num_threads`` keeps it; the others count its threads as taken.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger("lorakit")

RECHECK_SECONDS = 2.0


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def registry_folder() -> Path:
    return Path(tempfile.gettempdir()) / f"lorakit-trainings-{os.getuid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OverflowError):
        return False
    with contextlib.suppress(OSError, IndexError):  # a zombie is not a training
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    return True


class CoreShare:
    """This process's entry among the machine's trainings, and the threads that leaves it.

    Args:
        fixed: Threads this training was told to use (``train.num_threads``); None to take a share.
        folder: Where the trainings register (default :func:`registry_folder`).
        cores: The cores to share (default :func:`cpu_cores`).
    """

    def __init__(self, fixed: int | None = None, *, folder: Path | None = None, cores: int | None = None):
        self.fixed, self.folder, self.cores = fixed, folder or registry_folder(), cores or cpu_cores()
        self.pid = os.getpid()
        self.threads: int | None = None
        self.pending: str | None = None  # a quiet apply's message, logged once the run starts
        self._before: int | None = None  # torch's threads before the first change, given back on close
        self._checked = 0.0
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entry = self.folder / f"{self.pid}.json"
        self.entry.write_text(json.dumps({"pid": self.pid, "threads": fixed, "started": time.time()}))

    def others(self) -> list[int | None]:
        """The other live trainings' fixed threads (None: taking a share); stale entries are removed."""
        found: list[int | None] = []
        for path in self.folder.glob("*.json"):
            try:
                entry = json.loads(path.read_text())
                pid = int(entry["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if pid == self.pid:
                continue
            if not _alive(pid):
                path.unlink(missing_ok=True)
                continue
            found.append(entry.get("threads"))
        return found

    def share(self) -> int:
        """The threads this training should use now."""
        if self.fixed:
            return self.fixed
        others = self.others()
        free = self.cores - sum(t for t in others if t)
        sharing = 1 + sum(1 for t in others if not t)
        return max(1, free // sharing)

    def apply(self, *, force: bool = False, quiet: bool = False) -> int:
        """Set torch's threads to :meth:`share` (at most every few seconds unless ``force``); log a change
        (``quiet``: keep the message in :attr:`pending` instead, for when the run has started)."""
        now = time.monotonic()
        if not force and now - self._checked < RECHECK_SECONDS:
            return self.threads or 0
        self._checked = now
        n = self.share()
        if n != self.threads and not self.fixed:
            import torch

            self._before = torch.get_num_threads() if self._before is None else self._before
            torch.set_num_threads(n)
            others = len(self.others())
            if others or self.threads is not None:
                message = (
                    f"{others} other lorakit training{'' if others == 1 else 's'} on this machine: this one "
                    f"uses {n} of {self.cores} CPU cores (train.num_threads sets it)"
                )
                if quiet:
                    self.pending = message
                else:
                    log.info(message)
        self.threads = n
        return n

    def close(self) -> None:
        """Leave the machine's trainings; the process's threads are as they were (an API caller's
        next training, or a test, starts from them)."""
        self.entry.unlink(missing_ok=True)
        if self._before is not None:
            import torch

            torch.set_num_threads(self._before)
