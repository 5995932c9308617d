"""Live progress of a run, read from its ``train.log`` (written line by line while it trains).

``history.jsonl`` is only written when a run finishes; until then the log is the record. Its lines
come from :mod:`lorakit.training`::

    2026-11-30 09:01:02,345 DEBUG step 20/120 (epoch 0.50): loss=0.6931 lr=1.00e-03
    2026-11-30 09:01:09,001 INFO eval step 40 (epoch 1.00): loss=0.6012, accuracy=0.7500  (best)
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

STEP = re.compile(r"step (\d+)/(\d+) \(epoch ([\d.]+)\): loss=([-\d.eE+naif]+) lr=([-\d.eE+]+)")
EVAL = re.compile(r"eval step (\d+) \(epoch ([\d.]+)\): (.*?)(  \(best\))?$")
PAIR = re.compile(r"(\w+)=([-\d.eE+naif]+)")
STAMP = "%Y-%m-%d %H:%M:%S"


def _stamp(line: str) -> float | None:
    try:
        return time.mktime(time.strptime(line[:19], STAMP)) + int(line[20:23]) / 1000
    except ValueError:
        return None


def read_progress(run: Path, *, tail: int = 30) -> dict[str, Any]:
    """Steps, loss and evaluation curves, ETA and the log's last lines, from ``run``.

    A finished run's ``history.jsonl`` is used for the curves when present (it survives resumes
    in one piece).

    Returns:
        ``{"step", "total", "eta_seconds", "train": [[step, loss]...], "validation": [{step, ...}],
        "log": [last lines]}``.
    """
    out: dict[str, Any] = {
        "step": 0,
        "total": None,
        "eta_seconds": None,
        "train": [],
        "validation": [],
        "log": [],
    }
    try:
        lines = (run / "train.log").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    times: list[tuple[float, int]] = []  # (time, step) of step lines since the last (re)start
    for line in lines:
        if "resumed from checkpoint" in line:
            times = []
        if m := EVAL.search(line):
            row = {"step": int(m[1]), "epoch": float(m[2])} | {k: float(v) for k, v in PAIR.findall(m[3])}
            out["validation"] = [r for r in out["validation"] if r["step"] != row["step"]] + [row]
        elif m := STEP.search(line):
            step, total = int(m[1]), int(m[2])
            out["train"] = [p for p in out["train"] if p[0] < step] + [[step, float(m[4])]]
            out["step"], out["total"] = step, total
            if (ts := _stamp(line)) is not None:
                times.append((ts, step))
    history = _history(run)
    if history:
        out["train"] = [[r["step"], r["loss"]] for r in history if r.get("split") == "train" and "loss" in r]
        out["validation"] = [
            {k: v for k, v in r.items() if k != "split"} for r in history if r.get("split") == "validation"
        ]
    if len(times) >= 2 and out["total"]:
        (t0, s0), (t1, s1) = times[0], times[-1]
        if s1 > s0:
            out["eta_seconds"] = round((t1 - t0) / (s1 - s0) * (out["total"] - s1))
    out["log"] = lines[-tail:]
    out["phase"] = _phase(run, lines, out)
    return out


def _phase(run: Path, lines: list[str], progress: dict[str, Any]) -> str:
    """What a running run is doing outside its training steps ("" while it steps): train.log starts
    once the data is read, and the test split is scored after the last step."""
    if not progress["train"]:
        return "reading the data" if not lines else "loading the model and taking the first steps"
    if progress["total"] and progress["step"] >= progress["total"] and not (run / "metrics.json").exists():
        scored = any(" INFO test (" in line for line in lines)
        return "writing the adapter and report" if scored else "final evaluation: scoring the test split"
    return ""


def _history(run: Path) -> list[dict[str, Any]]:
    try:
        text = (run / "history.jsonl").read_text(encoding="utf-8")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def signature(run: Path) -> tuple[float, ...]:
    """Changes whenever something the run page shows changes (cheap: a few stat calls)."""
    sig: list[float] = []
    for name in ("train.log", "metrics.json", "history.jsonl", "checkpoints"):
        try:
            st = (run / name).stat()
            sig += [st.st_mtime_ns, st.st_size]
        except OSError:
            sig += [0, 0]
    return tuple(sig)
