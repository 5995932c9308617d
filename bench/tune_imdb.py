"""Hyperparameter search: `lorakit tune` with pruning against the shipped defaults, and against no pruning.

The IMDB setting of bench/quality.py: 2,000 training reviews, one epoch, 256 tokens, the packaged
MiniLM, 200 validation reviews (the search optimises validation accuracy, evaluated every 25 of the
125 steps so the median pruner has something to judge), 1,000 held-out test reviews no trial trains
or selects on. Three runs, one after the other:

  defaults   `lorakit train` with a config naming only data, model and budget
  pruned     `lorakit tune`, 16 trials, TPE + median pruner
  unpruned   the same search without pruning (pruner: none): the wall time pruning saves

    .venv/bin/python bench/tune_imdb.py --out bench/out/tune_imdb.json     # hours on 2 cores
    .venv/bin/python bench/tune_imdb.py --work bench/out/tune_imdb          # resumable: stop it any
        # time and run the same command again; finished parts are kept, each study continues
    .venv/bin/python bench/tune_imdb.py --quick                            \
# 64 reviews, 2 trials: a smoke test

Reported: each run's time, the best trial's validation and held-out test accuracy beside the
defaults', and how many trials were pruned. A search's time is the sum of its trials' times as the study
recorded them (trials cut short by stopping the script are marked interrupted by `lorakit tune`, not
counted, and run again), so a search spread over several sittings is timed like one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

N_TRAIN, N_VAL, N_TEST = 2000, 200, 1000
SPACE = {
    "train.learning_rate": {"low": 1e-4, "high": 5e-3, "log": True},
    "lora.r": {"choices": [4, 8, 16, 32]},
    "lora.alpha": {"choices": [8, 16, 32]},
    "lora.target_modules": {"choices": [["query", "value"], ["query", "key", "value"], "all-linear"]},
    "lora.layers": {"choices": [None, [-3, -2, -1]]},
}


def lorakit(args: list[str]) -> float:
    """Run a lorakit command in its own process; return its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lorakit", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def search(base: Path, work: Path, name: str, pruner: str, trials: int, eval_every: int) -> dict[str, Any]:
    cfg = yaml.safe_load(base.read_text())
    cfg["train"]["eval_every_steps"] = eval_every
    cfg["output"] = {"dir": str(work / name), "report": False, "tensorboard": False}
    cfg["tune"] = {
        "space": SPACE,
        "n_trials": trials,
        "pruner": pruner,
        "startup_trials": 4,
        "warmup_evals": 1,
        "seed": common.SEED,
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    lorakit(["tune", str(path)])  # continues the study when an earlier sitting left it unfinished
    summary = json.loads((work / name / "study.json").read_text())
    best = summary["best"]
    counted = [t for t in summary["trials"] if t["state"] in ("COMPLETE", "PRUNED")]
    states = [t["state"] for t in summary["trials"]]
    return {
        "name": name,
        "seconds": sum(t["seconds"] or 0.0 for t in counted),
        "trials": len(states),
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
        "validation_accuracy": best["value"],
        "test_accuracy": best["test_value"],
        "best_params": best["params"],
    }


def defaults_run(base: Path, work: Path) -> dict[str, Any]:
    """The shipped defaults (config ``base``) on the same data, kept from an earlier sitting in ``work``."""
    done = work / "defaults.json"
    if done.is_file():
        return json.loads(done.read_text())
    seconds = lorakit(["train", str(base), "--no-progress", "--overwrite"])
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    result = {
        "name": "defaults",
        "seconds": seconds,
        "validation_accuracy": metrics["validation"]["accuracy"],
        "test_accuracy": metrics["test"]["accuracy"],
    }
    done.write_text(json.dumps(result))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="64 training reviews, 2 trials: a smoke test of the script, not a measurement",
    )
    ap.add_argument("--trials", type=int, help="trials per search (default 16; 2 with --quick)")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    ap.add_argument(
        "--work", type=Path, help="keep the data, runs and studies here (resumable); default: a temp folder"
    )
    args = ap.parse_args()
    trials = args.trials or (2 if args.quick else 16)
    sizes, eval_every = ((64, 16, 32), 2) if args.quick else ((N_TRAIN, N_VAL, N_TEST), 25)
    print(
        f"# bench/tune_imdb.py{' --quick (a smoke test, not a measurement)' if args.quick else ''}"
        f": {sizes[0]} IMDB training reviews, 1 epoch, "
        f"packaged MiniLM; {trials} trials per search; accuracy on {sizes[2]} held-out reviews",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="lorakit-tune-imdb-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # The seeded slices and the config are written again on every sitting: the same files each time.
        base = common.lorakit_config(common.write_slices(work / "data", *sizes), work)
        results = [defaults_run(base, work)]
        results.append(search(base, work, "pruned", "median", trials, eval_every))
        results.append(search(base, work, "unpruned", "none", trials, eval_every))
    for r in results:
        extra = (
            f"  {r['trials']} trials, {r['pruned']} pruned, {r['failed']} failed; best "
            f"{json.dumps(r['best_params'])}"
            if "trials" in r
            else ""
        )
        print(
            f"{r['name']:9s} validation {100 * r['validation_accuracy']:5.1f}%  test "
            f"{100 * r['test_accuracy']:5.1f}%  {r['seconds'] / 60:6.1f} min{extra}",
            flush=True,
        )
    pruned, unpruned = results[1], results[2]
    print(
        f"pruning: {pruned['seconds'] / unpruned['seconds']:.2f}x the wall time of the unpruned search; "
        f"best test accuracy {100 * (pruned['test_accuracy'] - results[0]['test_accuracy']):+.1f} "
        "points against the defaults"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
