"""The run queue: at most N of the UI's trainings run at once; the others wait their turn.

Two trainings side by side on a few CPU cores (or one GPU) each run slower than half speed (or run
out of memory), so "Start" and "Resume" queue a run (:func:`.launch.start_run`) and :func:`pump`
starts queued runs, oldest first, while fewer than ``slots`` of the UI's runs are running. The queue
is nothing but the runs' records in ``.lorakit-ui/<name>.json`` (``queued``: when it joined, the
command to run): a restarted UI finds it on disk and carries on. A file lock keeps two UIs on one
workspace from starting the same run twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
from pathlib import Path
from typing import Any

from lorakit.ui import launch
from lorakit.ui.workspace import Workspace, pid_alive, read_json

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0


def default_slots() -> int:
    """One training at a time on CPU; one per GPU where there are GPUs."""
    try:
        import torch

        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    except Exception:  # no usable torch here: the runs will say so themselves
        return 1


def _records(ws: Workspace) -> dict[str, dict[str, Any]]:
    if not ws.state.is_dir():
        return {}
    out = {}
    for path in ws.state.glob("*.json"):
        rec = read_json(path)
        if isinstance(rec, dict):
            out[path.name.removesuffix(".json")] = rec
    return out


def _is_running(name: str, rec: dict[str, Any]) -> bool:
    alive = bool(rec.get("pid")) and (pid_alive(int(rec["pid"])) or launch.watched(name))
    return alive and rec.get("exit_code") is None


def queued(ws: Workspace) -> list[str]:
    """The queued runs, first in line first."""
    recs = _records(ws)
    waiting = [n for n, r in recs.items() if r.get("queued") and not r.get("pid") and not r.get("cancelled")]
    return sorted(waiting, key=lambda n: (recs[n]["queued"], n))


def running(ws: Workspace) -> list[str]:
    """The runs the UI started whose process is alive."""
    return sorted(n for n, r in _records(ws).items() if _is_running(n, r))


def place(ws: Workspace, name: str) -> tuple[int, int] | None:
    """``(place, length)`` of a queued run (1 = next to start), None when it is not queued."""
    line = queued(ws)
    return (line.index(name) + 1, len(line)) if name in line else None


@contextlib.contextmanager
def _locked(ws: Workspace) -> Any:
    ws.state.mkdir(parents=True, exist_ok=True)
    with (ws.state / "queue.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pump(ws: Workspace, slots: int) -> list[str]:
    """Start queued runs while fewer than ``slots`` run.

    Returns:
        The runs started now.
    """
    started = []
    with _locked(ws):
        free = slots - len(running(ws))
        for name in queued(ws)[: max(0, free)]:
            rec = read_json(ws.state_file(name, ".json")) or {}
            log.info("starting queued run %s", name)
            launch.spawn(ws, name, list(rec.get("args") or []), Path(rec.get("cwd") or ws.root))
            started.append(name)
    return started


class Pump:
    """A thread calling :func:`pump` every second, for the life of the UI server."""

    def __init__(self, ws: Workspace, slots: int) -> None:
        self.ws, self.slots = ws, slots
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lorakit-ui-queue", daemon=True)

    def start(self) -> Pump:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                pump(self.ws, self.slots)
            except Exception as exc:  # a bad record must not stop the queue for the others
                log.warning("run queue: %s: %s", type(exc).__name__, exc)
            self._stop.wait(POLL_SECONDS)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
