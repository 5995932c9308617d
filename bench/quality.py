"""Adaptation quality: lorakit's defaults against full fine-tuning and PEFT's usual LoRA recipe.

One command, one run, the same data, model, seed and budget for every configuration: 2,000 IMDB
training reviews, one epoch, 256 tokens, the packaged MiniLM, scored on 1,000 held-out reviews that
no configuration trains on (lorakit also gets 200 other reviews as its validation split, which it
uses to pick the best checkpoint; with one epoch there is one evaluation).

  full       full fine-tuning, transformers Trainer, lr 5e-5 (bench/common.py, no lorakit import)
  full-head-tail   the same, with long reviews cut as lorakit cuts them by default (head + tail)
  peft       PEFT's guide: r=8, alpha 16, dropout 0.1, query/value, lr 1e-3, Trainer
  lorakit    `lorakit train` with a config naming only data, model and budget (its defaults)

Levers are measured as lorakit configurations with overrides on top of the defaults:

    .venv/bin/python bench/quality.py                          # full, peft, lorakit (~20 min on 2 cores)
    .venv/bin/python bench/quality.py --only lorakit \\
        --variant "lr1e-3=train.learning_rate=1e-3" --variant "qv=lora.target_modules=[query,value]"

Each configuration runs in its own process, one after the other.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

SCRIPT = Path(__file__).resolve()
N_TRAIN, N_VAL, N_TEST = 2000, 200, 1000


def child(name: str, work: Path, overrides: list[str], quick: bool) -> None:
    slices = common.write_slices(work / "data", *((64, 16, 32) if quick else (N_TRAIN, N_VAL, N_TEST)))
    if name in ("full", "full-head-tail"):
        r = common.reference(slices, lora=False, lr=5e-5, work=work, head_tail=name == "full-head-tail")
    elif name == "peft":
        r = common.reference(slices, lora=True, lr=1e-3, work=work)
    else:
        import lorakit

        t0 = time.perf_counter()
        res = lorakit.train(common.lorakit_config(slices, work), overrides=overrides, progress=False)
        r = {
            "accuracy": res.test["accuracy"],
            "seconds": time.perf_counter() - t0,
            "trainable": res.trainable_params,
            "total": res.total_params,
            "steps": res.history[-1]["step"] if res.history else None,
            "peak_rss_mb": common.peak_rss_mb(),
        }
    common.emit({"name": name, "overrides": overrides, **r})


def main() -> None:
    ran = common.run_main(
        SCRIPT,
        __doc__,
        child,
        only=["full", "full-head-tail", "peft", "lorakit"],
        only_help="which of full, full-head-tail, peft, lorakit to run",
        header=f"# bench/quality.py: {N_TRAIN} IMDB training reviews, 1 epoch, 256 tokens, packaged "
        f"MiniLM; accuracy on {N_TEST} held-out reviews",
        quick_header="# bench/quality.py --quick: 64 training reviews, a smoke test, not a measurement",
    )
    if ran is None:
        return
    args, results = ran
    by = {r["name"]: r for r in results}
    for base in ("full", "full-head-tail"):
        if base in by:
            print(f"\ngaps to {base} (accuracy points; time as a ratio):")
            for r in results:
                if not r["name"].startswith("full"):
                    print(
                        f"  {r['name']:28s} {100 * (r['accuracy'] - by[base]['accuracy']):+5.1f} points, "
                        f"{r['seconds'] / by[base]['seconds']:.2f}x the time"
                    )
    if "peft" in by:
        print("time against PEFT's usual recipe:")
        for r in results:
            if r["name"].startswith("lorakit"):
                print(f"  {r['name']:28s} {r['seconds'] / by['peft']['seconds']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
