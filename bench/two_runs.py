"""Two trainings on one machine: started together vs one after the other (target: together <= 1.15x).

Two `lorakit train` processes of the IMDB config (MiniLM, LoRA r=16) on 480 reviews x 128 tokens,
30 steps each, differing only in their seed, timed three ways:

  one after the other   A, then B (each alone: torch's default threads, all cores)
  together, shared      A and B started at once; each divides the cores with the other
                        (lorakit.runtime.sharing: what `lorakit train` does today)
  together, 2 threads   A and B started at once, each told train.num_threads = all cores
                        (what every run did before the cores were shared)

Reported: the wall time of each way, the ratio of together to one after the other, and the median
seconds per training step (from the runs' train.log time stamps).

    .venv/bin/python bench/two_runs.py                  # ~6 min on 2 cores
    .venv/bin/python bench/two_runs.py --steps 10       # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import minilm_path, write_slices

from lorakit.runtime.sharing import cpu_cores

RESULTS = Path(__file__).resolve().parent / "results"


def config(work: Path, slices: dict[str, Path], steps: int) -> Path:
    cfg = {
        "task": "text-classification",
        "data": {
            "train": str(slices["train"]),
            "validation": str(slices["validation"]),
            "label_names": ["negative", "positive"],
            "max_length": 128,
        },
        "model": {"name_or_path": minilm_path(), "dropout": 0.0},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {
            "max_steps": steps,
            "batch_size": 16,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "eval_every_steps": None,
            "save_every_steps": None,
        },
        "output": {"tensorboard": False, "report": False},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(cfg: Path, out: Path, seed: int, extra: list[str]) -> subprocess.Popen:
    args = ["--set", f"output.dir={out}", "--set", f"train.seed={seed}", "--overwrite", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "lorakit", "train", str(cfg), "--no-progress", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )


def wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            sys.exit(f"a training failed (exit {p.returncode}): {err.decode()[-800:]}")


def step_seconds(run: Path) -> list[float]:
    """Seconds between consecutive step lines of train.log."""
    stamps = []
    for line in (run / "train.log").read_text().splitlines():
        if " step " in line and "/" in line.split(" step ", 1)[1][:8] and "eval" not in line:
            t = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
            stamps.append(t)
    return [b - a for a, b in itertools.pairwise(stamps)]


def way(cfg: Path, work: Path, name: str, together: bool, extra: list[str]) -> dict:
    runs = [work / f"{name}-a", work / f"{name}-b"]
    t0 = time.perf_counter()
    if together:
        wait([start(cfg, runs[0], 1, extra), start(cfg, runs[1], 2, extra)])
    else:
        for i, run in enumerate(runs):
            wait([start(cfg, run, i + 1, extra)])
    wall = time.perf_counter() - t0
    steps = [s for run in runs for s in step_seconds(run)]
    return {
        "way": name,
        "wall_seconds": round(wall, 1),
        "median_step_seconds": round(statistics.median(steps), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument(
        "--out", type=Path, default=None, help="result stem (default bench/results/two_runs-DATE)"
    )
    args = ap.parse_args()
    cores = cpu_cores()
    with tempfile.TemporaryDirectory(prefix="lorakit-two-runs-") as tmp:
        work = Path(tmp)
        slices = write_slices(work / "data", 480, 32, 0)
        cfg = config(work, slices, args.steps)
        rows = [
            way(cfg, work, "one after the other", False, []),
            way(cfg, work, "together, shared", True, []),
            way(cfg, work, f"together, {cores} threads each", True, ["--set", f"train.num_threads={cores}"]),
        ]
    base = rows[0]["wall_seconds"]
    for r in rows:
        r["vs_one_after_the_other"] = round(r["wall_seconds"] / base, 2)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cores": cores,
        "setup": f"MiniLM LoRA r=16, 480 IMDB reviews x 128 tokens, batch 16, {args.steps} steps per run",
        "rows": rows,
    }
    lines = [
        f"Two trainings on {cores} cores ({result['setup']}), {result['date']}",
        "",
        "| way | wall s | vs one after the other | median s / step |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['way']} | {r['wall_seconds']} | {r['vs_one_after_the_other']}x "
            f"| {r['median_step_seconds']} |"
            for r in rows
        ),
    ]
    stem = args.out or RESULTS / f"two_runs-{result['date']}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
