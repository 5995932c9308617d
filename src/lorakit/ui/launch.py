"""Start, stop, resume and delete ``lorakit train`` runs as processes of their own.

Start and resume do not start a process themselves: they queue the run (:mod:`.runqueue` starts
it when a slot is free). A run started here runs in its own session (``start_new_session``):
closing the browser or the UI server does not stop it, and the UI finds it again from
``.lorakit-ui/<name>.json`` (pid, start time, command; the exit code once the UI saw it end).
Its console output goes to ``.lorakit-ui/<name>.out``. Stopping sends SIGTERM to the process group:
training finishes the step, writes a checkpoint and exits with code 130
(:mod:`lorakit.runtime.stopping`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from lorakit.files.atomic import write_json_atomic, write_text_atomic
from lorakit.ui.startcheck import name_taken
from lorakit.ui.workspace import (
    Workspace,
    WorkspaceError,
    has_checkpoint,
    pid_alive,
    read_json,
    read_run,
)


def _record(ws: Workspace, name: str, **fields: Any) -> dict[str, Any]:
    ws.state.mkdir(parents=True, exist_ok=True)
    path = ws.state_file(name, ".json")
    data = (read_json(path) or {}) | fields
    write_json_atomic(path, data)
    return data


def spawn(ws: Workspace, name: str, args: list[str], cwd: Path) -> subprocess.Popen:
    """Run ``python -m lorakit <args>`` detached; a thread records its exit code when it ends.

    The record keeps the run's first start time (``started``); a resumed run adds ``resumed``.
    """
    out = ws.state_file(name, ".out")
    cmd = [sys.executable, "-m", "lorakit", *args]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with out.open("ab") as fh:
        fh.write(f"$ lorakit {' '.join(args)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    now, before = time.time(), read_json(ws.state_file(name, ".json")) or {}
    _record(
        ws,
        name,
        pid=proc.pid,
        started=before.get("started") or now,
        command=["lorakit", *args],
        cwd=str(cwd),
        exit_code=None,
        queued=None,
        stop_requested=None,
        **({"resumed": now} if "--resume" in args else {}),
    )

    def wait() -> None:  # also reaps the child, so it never lingers as a zombie
        code = proc.wait()
        _record(ws, name, exit_code=code, ended=time.time())
        _WATCHED.discard(name)

    _WATCHED.add(name)
    threading.Thread(target=wait, name=f"lorakit-ui-wait-{name}", daemon=True).start()
    return proc


#: The runs this process started whose exit is not yet on record: the queue counts them as running until
#: it is, so a run's recorded end never comes after the start of the run that took its place.
_WATCHED: set[str] = set()


def watched(name: str) -> bool:
    """Whether this process started ``name`` and has not yet recorded its exit."""
    return name in _WATCHED


def _enqueue(ws: Workspace, name: str, args: list[str], cwd: Path) -> None:
    """Put the run in the queue (its place is its queued time); :func:`.runqueue.pump` starts it."""
    _record(ws, name, queued=time.time(), args=args, cwd=str(cwd), exit_code=None, pid=None, cancelled=None)


def start_run(ws: Workspace, name: str, config: dict[str, Any]) -> Path:
    """Write ``config`` (output.dir = runs/<name>) and queue it for training.

    Returns:
        The config file written (``.lorakit-ui/<name>.yaml``).

    Raises:
        WorkspaceError: Bad name, or a run of that name exists already.
    """
    if (taken := name_taken(ws, name)) is not None:
        raise WorkspaceError(taken)
    config = dict(config) | {"output": dict(config.get("output") or {}) | {"dir": f"runs/{name}"}}
    ws.state.mkdir(parents=True, exist_ok=True)
    path = ws.state_file(name, ".yaml")
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    ws.state_file(name, ".json").unlink(missing_ok=True)
    _enqueue(ws, name, ["train", str(path), "--no-progress"], ws.root)
    return path


def resume_run(ws: Workspace, name: str) -> None:
    """Continue an interrupted run from its newest checkpoint (``lorakit train <run>/config.yaml --resume``).

    Raises:
        WorkspaceError: The run is running or finished, or its output.dir does not lead back to it.
    """
    info = read_run(ws, name)
    if info.status != "interrupted" or not has_checkpoint(info.path):
        raise WorkspaceError(
            f"run '{name}' is {info.status}; only a run stopped with a checkpoint can be resumed "
            "(open a failed one in the form to fix and start it again)"
        )
    out_dir = Path(str((info.config.get("output") or {}).get("dir", "")))
    cwd = _cwd_for(info.path, out_dir)
    _enqueue(ws, name, ["train", str(info.path / "config.yaml"), "--resume", "--no-progress"], cwd)


def _cwd_for(run: Path, out_dir: Path) -> Path:
    """The folder from which ``output.dir`` names ``run`` (resume must see the same config)."""
    if out_dir.is_absolute():
        if out_dir.resolve() == run:
            return run.parent
    elif out_dir.parts and run.parts[-len(out_dir.parts) :] == out_dir.parts:
        return Path(*run.parts[: -len(out_dir.parts)]) if len(run.parts) > len(out_dir.parts) else Path("/")
    raise WorkspaceError(
        f"run '{run.name}': its output.dir '{out_dir}' does not lead to {run}; resume it from the CLI"
    )


def _running(ws: Workspace, name: str) -> int | None:
    rec = read_json(ws.state_file(name, ".json")) or {}
    pid = rec.get("pid")
    return int(pid) if pid and rec.get("exit_code") is None and pid_alive(int(pid)) else None


def stop_run(ws: Workspace, name: str) -> None:
    """Ask a run the UI started to stop cleanly (SIGTERM to its process group); a queued run leaves
    the queue (cancelled).

    Raises:
        WorkspaceError: The UI has no live process for the run (e.g. it was started from the CLI:
            stop it there with Ctrl-C, which stops just as cleanly).
    """
    rec = read_json(ws.state_file(name, ".json")) or {}
    if rec.get("queued") and not rec.get("pid"):
        _record(ws, name, queued=None, cancelled=time.time())
        return
    pid = _running(ws, name)
    if pid is None:
        raise WorkspaceError(
            f"run '{name}' has no training process started by this UI; a CLI run stops with Ctrl-C "
            "in its terminal"
        )
    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
        os.killpg(pid, signal.SIGTERM)
    _record(ws, name, stop_requested=time.time())


def delete_run(ws: Workspace, name: str) -> None:
    """Remove a failed, interrupted or cancelled run: its folder and the UI's files of it.

    Raises:
        WorkspaceError: The run is running, queued or finished (a finished run is kept: publish it,
            or remove its folder by hand).
    """
    info = read_run(ws, name)
    if info.status not in ("failed", "interrupted", "cancelled"):
        raise WorkspaceError(
            f"run '{name}' is {info.status}; only failed, interrupted or cancelled runs can be deleted here"
        )
    if info.path.exists():
        shutil.rmtree(info.path)
    for suffix in (".json", ".yaml", ".out"):
        ws.state_file(name, suffix).unlink(missing_ok=True)
