"""Start, stop and resume ``lorakit train`` as processes of their own.

A run started here runs in its own session (``start_new_session``): closing the browser or the UI
server does not stop it, and the UI finds it again from ``.lorakit-ui/<name>.json`` (pid, start
time, command; the exit code once the UI saw it end). Its console output goes to
``.lorakit-ui/<name>.out``. Stopping sends SIGTERM to the process group: training finishes the
step, writes a checkpoint and exits with code 130 (:mod:`lorakit.runtime.stopping`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from lorakit.files.atomic import write_json_atomic, write_text_atomic
from lorakit.ui.workspace import Workspace, WorkspaceError, pid_alive, read_json, read_run


def _record(ws: Workspace, name: str, **fields: Any) -> dict[str, Any]:
    ws.state.mkdir(parents=True, exist_ok=True)
    path = ws.state_file(name, ".json")
    data = (read_json(path) or {}) | fields
    write_json_atomic(path, data)
    return data


def _spawn(ws: Workspace, name: str, args: list[str], cwd: Path) -> subprocess.Popen:
    """Run ``python -m lorakit <args>`` detached; a thread records its exit code when it ends."""
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
    _record(
        ws, name, pid=proc.pid, started=time.time(), command=["lorakit", *args], cwd=str(cwd), exit_code=None
    )

    def wait() -> None:  # also reaps the child, so it never lingers as a zombie
        code = proc.wait()
        _record(ws, name, exit_code=code, ended=time.time())

    threading.Thread(target=wait, name=f"lorakit-ui-wait-{name}", daemon=True).start()
    return proc


def start_run(ws: Workspace, name: str, config: dict[str, Any]) -> Path:
    """Write ``config`` (output.dir = runs/<name>) and start training it.

    Returns:
        The config file written (``.lorakit-ui/<name>.yaml``).

    Raises:
        WorkspaceError: Bad name, or a run of that name exists already.
    """
    run = ws.run_dir(name)
    if (run.exists() and any(run.iterdir())) or _running(ws, name):
        raise WorkspaceError(f"run name '{name}': a run of that name exists already; choose another name")
    config = dict(config) | {"output": dict(config.get("output") or {}) | {"dir": f"runs/{name}"}}
    ws.state.mkdir(parents=True, exist_ok=True)
    path = ws.state_file(name, ".yaml")
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    ws.state_file(name, ".json").unlink(missing_ok=True)
    _spawn(ws, name, ["train", str(path), "--no-progress"], ws.root)
    return path


def resume_run(ws: Workspace, name: str) -> None:
    """Continue an interrupted run from its newest checkpoint (``lorakit train <run>/config.yaml --resume``).

    Raises:
        WorkspaceError: The run is running or finished, or its output.dir does not lead back to it.
    """
    info = read_run(ws, name)
    if info.status in ("running", "finished"):
        raise WorkspaceError(f"run '{name}' is {info.status}; only interrupted or failed runs can be resumed")
    out_dir = Path(str((info.config.get("output") or {}).get("dir", "")))
    cwd = _cwd_for(info.path, out_dir)
    _spawn(ws, name, ["train", str(info.path / "config.yaml"), "--resume", "--no-progress"], cwd)


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
    """Ask a run the UI started to stop cleanly (SIGTERM to its process group).

    Raises:
        WorkspaceError: The UI has no live process for the run (e.g. it was started from the CLI:
            stop it there with Ctrl-C, which stops just as cleanly).
    """
    pid = _running(ws, name)
    if pid is None:
        raise WorkspaceError(
            f"run '{name}' has no training process started by this UI; a CLI run stops with Ctrl-C "
            "in its terminal"
        )
    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
        os.killpg(pid, signal.SIGTERM)
    _record(ws, name, stop_requested=time.time())
