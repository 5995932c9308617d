"""Training speed: lorakit's defaults against the recipe people copy (PEFT guide + Trainer), one run.

Same model (packaged MiniLM), same 2,000 IMDB training reviews, same 1,000 held-out reviews, same
seed, one process tree; each configuration in a child process of its own:

  reference  PEFT's sequence-classification guide: Trainer, DataCollatorWithPadding, r=8, alpha 16,
             dropout 0.1, query/value, lr 1e-3, batch 16, fp32, max length 256, one epoch
             (bench/common.py, no lorakit import)
  lorakit    `lorakit train` with a config naming only data, model and budget (max length 256, one
             epoch); it scores the held-out reviews every 10 optimizer steps, so the moment it first
             reaches the reference's final accuracy is known (scoring time is not counted). Its
             default precision is bf16 autocast on CPUs with native bf16 (AVX512-BF16 / AMX), fp32
             on others
  lorakit:fp32  the same with train.mixed_precision=no (fp32)

Printed for each: wall time to the reference's final held-out accuracy (from the start, model load
and tokenisation included, scoring excluded), training samples/s, peak RSS, and MFU:

  MFU = model FLOPs of the training steps / their time / dense matmul FLOP/s measured here
  model FLOPs per sequence of T real tokens (padding not counted) =
      2 x (2 T P + 4 L T^2 d)    forward + the input-gradient half of the backward pass
  with P the weights of the encoder's linear layers (10.6 M for MiniLM), L layers, hidden size d.
  The base is frozen in both recipes, so no weight gradients are computed for it; the LoRA
  matrices' own FLOPs (< 3 %) are left out. Dense matmul FLOP/s: the best of 2048 x 2048 matmuls
  at the same thread count, measured before and after the runs, in the precision the run computes
  in (fp32, or bf16 for a bf16-autocast run: its MFU is against the bf16 peak, not fp32's).

    .venv/bin/python bench/train_speed.py            # ~40 min on 2 CPU cores
    .venv/bin/python bench/train_speed.py --quick    # smoke test of the script
    .venv/bin/python bench/train_speed.py --variant "dropout=model.dropout=0.1"   # a lever, measured beside
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

SCRIPT = Path(__file__).resolve()
N_TRAIN, N_TEST = 2000, 1000
EVAL_EVERY = 10


def training_flops(slices: dict[str, Path], max_length: int = 256) -> float:
    """Model FLOPs of one epoch over the training slice (formula in the module docstring)."""
    import csv

    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = common.minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    with open(slices["train"], newline="", encoding="utf-8") as fh:
        texts = [r["text"] for r in csv.DictReader(fh)]
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    cfg = AutoConfig.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    p = sum(m.weight.numel() for m in model.encoder.modules() if isinstance(m, torch.nn.Linear))
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    return sum(2 * (2 * t * p + 4 * L * t * t * d) for t in lengths)


def child(name: str, work: Path, overrides: list[str], quick: bool) -> None:
    slices = common.write_slices(work / "data", *((64, 16, 48) if quick else (N_TRAIN, 200, N_TEST)))
    if name == "reference":
        r = common.reference(slices, lora=True, lr=1e-3, work=work)
        r["curve"], r["precision"] = [{"seconds": r["seconds"], "accuracy": r["accuracy"]}], "fp32"
    else:
        import lorakit

        # The held-out reviews become the validation split, scored every EVAL_EVERY steps (not timed).
        extra = [
            f"data.validation={slices['test']}",
            "data.test=null",
            f"train.eval_every_steps={EVAL_EVERY}",
            "train.save_every_steps=null",
            *overrides,
        ]
        t0 = time.perf_counter()
        res = lorakit.train(common.lorakit_config(slices, work), overrides=extra, progress=False)
        metrics = json.loads((res.run_dir / "metrics.json").read_text())
        curve = [
            {"seconds": h["seconds"], "accuracy": h["accuracy"], "step": h["step"]}
            for h in res.history
            if h["split"] == "validation"
        ]
        r = {
            "accuracy": curve[-1]["accuracy"],
            "seconds": time.perf_counter() - t0,
            "train_seconds": metrics["train_seconds"],
            "steps": metrics["steps"],
            "examples": metrics["data_sizes"]["train"],
            "precision": metrics["precision"],
            "trainable": res.trainable_params,
            "total": res.total_params,
            "curve": curve,
            "peak_rss_mb": common.peak_rss_mb(),
        }
    common.emit({"name": name, "overrides": overrides, **r})


def main() -> None:
    args = common.parser(__doc__).parse_args()
    if args.child:
        child(args.child, args.work, args.set, args.quick)
        return

    import torch

    configs = [
        ("reference", []),
        ("lorakit", []),
        ("lorakit:fp32", ["train.mixed_precision=no"]),
        *common.variants(args.variant),
    ]
    print(
        f"# bench/train_speed.py: packaged MiniLM, {N_TRAIN} IMDB training reviews, accuracy on {N_TEST} "
        f"held-out reviews; torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    before = {k: common.matmul_flops(k) for k in ("fp32", "bf16")}
    with tempfile.TemporaryDirectory(prefix="lorakit-speed-") as tmp:
        slices = common.write_slices(
            Path(tmp) / "data", *((64, 16, 48) if args.quick else (N_TRAIN, 200, N_TEST))
        )
        epoch_flops = training_flops(slices)
        results = common.run_configs(SCRIPT, configs, Path(tmp), args.quick, lines=False)
    peaks = {k: max(v, common.matmul_flops(k)) for k, v in before.items()}
    print(
        "dense matmul: "
        + "; ".join(
            f"{k} {v / 1e9:.1f} GFLOP/s (before the runs {before[k] / 1e9:.1f})" for k, v in peaks.items()
        )
        + f"; model FLOPs of one epoch {epoch_flops / 1e12:.2f} TFLOP\n"
    )

    ref = results[0]
    target = ref["accuracy"]
    print(
        f"| configuration | precision | final held-out acc. | time to {100 * target:.1f}% "
        "| training samples/s | MFU (of that precision's peak) | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        reached = next((c for c in r["curve"] if c["accuracy"] >= target), None)
        r["time_to_target"] = reached["seconds"] if reached else None
        r["samples_per_s"] = r["examples"] / r["train_seconds"]
        r["mfu"] = (
            epoch_flops
            * (r["examples"] / (64 if args.quick else N_TRAIN))
            / r["train_seconds"]
            / peaks["bf16" if "bf16" in r["precision"] else "fp32"]
        )
        when = f"{reached['seconds']:.0f} s" if reached else "not reached"
        print(
            f"| {r['name']} {' '.join(r['overrides'])} | {r['precision']} | {100 * r['accuracy']:.1f}% | "
            f"{when} | {r['samples_per_s']:.1f} | {100 * r['mfu']:.0f}% | {r['peak_rss_mb']:.0f} MB |",
            flush=True,
        )
    print("\nratios against the reference (targets: time <= 0.33x, MFU >= 70%, memory <= 1.0x):")
    for r in results[1:]:
        t = f"{r['time_to_target'] / ref['time_to_target']:.2f}x" if r["time_to_target"] else "not reached"
        print(
            f"  {r['name']:24s} time to accuracy {t}, "
            f"samples/s {r['samples_per_s'] / ref['samples_per_s']:.2f}x, "
            f"peak RSS {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x"
        )
    if args.out:
        args.out.write_text(
            json.dumps({"matmul_flops": peaks, "epoch_flops": epoch_flops, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
