"""The run queue and the sharing of CPU cores between trainings, without a browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.runtime.sharing import CoreShare
from lorakit.ui import launch, runqueue
from lorakit.ui.workspace import Workspace, read_json, read_run


def _queue(ws: Workspace, name: str, args: list[str]) -> None:
    """A run queued as start_run queues it (without writing a training config)."""
    launch._enqueue(ws, name, args, ws.root)
    time.sleep(0.01)  # distinct queued times: the order is the queue's


@pytest.mark.slow
def test_queue_starts_one_at_a_time_in_order_and_survives_a_restart(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    # a "training" that lasts until we let it go: `python -m lorakit` is what the queue runs
    blocker = tmp_path / "go"
    script = tmp_path / "wait.py"
    script.write_text(
        f"import pathlib, time\nwhile not pathlib.Path({str(blocker)!r}).exists(): time.sleep(0.05)\n"
    )
    for name in ("first", "second", "third"):
        _queue(ws, name, ["--help"])
    assert runqueue.queued(ws) == ["first", "second", "third"]
    assert runqueue.place(ws, "second") == (2, 3)
    assert read_run(ws, "second").status == "queued"
    launch.stop_run(ws, "third")  # cancel a queued run
    assert read_run(ws, "third").status == "cancelled" and runqueue.queued(ws) == ["first", "second"]

    # "first" is running (a live process the UI started): nothing else starts with one slot
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        rec = read_json(ws.state_file("first", ".json"))
        ws.state_file("first", ".json").write_text(json.dumps(rec | {"pid": proc.pid, "queued": None}))
        fresh = Workspace(tmp_path)  # a restarted UI: the queue is read from the workspace
        assert runqueue.running(fresh) == ["first"] and runqueue.pump(fresh, 1) == []
        assert read_run(fresh, "second").status == "queued" and runqueue.place(fresh, "second") == (1, 1)
        blocker.write_text("")
        proc.wait(timeout=30)
    finally:
        proc.kill()
    rec = read_json(ws.state_file("first", ".json"))
    ws.state_file("first", ".json").write_text(json.dumps(rec | {"exit_code": 0}))
    assert runqueue.pump(ws, 1) == ["second"]  # the slot freed: the next in line starts
    second = read_json(ws.state_file("second", ".json"))
    assert second["pid"] and second["command"] == ["lorakit", "--help"] and not second.get("queued")
    assert runqueue.queued(ws) == [] and runqueue.pump(ws, 1) == []
    deadline = time.time() + 60
    while read_json(ws.state_file("second", ".json")).get("exit_code") is None and time.time() < deadline:
        time.sleep(0.1)  # the thread that waits for the process records its exit code
    assert read_json(ws.state_file("second", ".json"))["exit_code"] == 0
    assert read_run(ws, "second").status == "failed"  # `lorakit --help` leaves no adapter


def test_resume_keeps_the_first_start_time(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    ws.state.mkdir(parents=True)
    ws.state_file("r", ".json").write_text(json.dumps({"pid": 1, "started": 1000.0, "exit_code": 130}))
    launch._enqueue(ws, "r", ["--version"], tmp_path)
    assert read_json(ws.state_file("r", ".json"))["started"] == 1000.0  # queued: still the first start


def test_cores_are_divided_between_trainings(tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    other_pid = os.getppid()  # a live process that is not this one stands in for another training
    try:
        me = CoreShare(folder=tmp_path, cores=4)
        assert me.share() == 4  # alone: every core
        other = tmp_path / f"{other_pid}.json"
        other.write_text(json.dumps({"pid": other_pid, "threads": None}))
        assert me.share() == 2
        assert me.apply(force=True) == 2 and torch.get_num_threads() == 2
        other.write_text(json.dumps({"pid": other_pid, "threads": 3}))  # it set train.num_threads = 3
        assert me.share() == 1
        (tmp_path / "999999999.json").write_text(json.dumps({"pid": 999_999_999, "threads": None}))
        assert me.share() == 1 and not (tmp_path / "999999999.json").exists()  # a dead entry is dropped
        fixed = CoreShare(2, folder=tmp_path, cores=4)
        assert fixed.share() == 2  # told its threads: keeps them
        fixed.close()
        me.close()
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"{other_pid}.json"]
        assert torch.get_num_threads() == before  # given back
    finally:
        torch.set_num_threads(before)
