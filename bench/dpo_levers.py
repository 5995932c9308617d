"""DPO step levers on SmolLM2-135M-Instruct, measured on training steps alone.

The pairs and settings of bench/dpo_vs_trl.py (IMDB review openings as chat prompts, 12-word chosen /
rejected continuations, LoRA r=8 on the 7 projections, batches of 8 pairs), built by lorakit's
preference task. A step = the DPO loss (policy with gradients, reference without), backward, AdamW.

  shared   each pair's prompt once, both answers from its cached keys and values (lorakit's default)
  plain    every row whole: the prompt twice per pair (what TRL does)

each in fp32 and in bf16 autocast, the four interleaved over ``--rounds``, best per configuration.
Also: the tokens each way puts through the model, and the two losses on one batch.

    .venv/bin/python bench/dpo_levers.py [--rounds 2] [--batches 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_trl import ALPHA, BATCH, MAX_LENGTH, TARGETS, R, model_folder, write_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4)
    args = ap.parse_args()

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.config.schema import LoraSettings
    from lorakit.data.batching import autocast
    from lorakit.models.modeling import apply_lora
    from lorakit.tasks import preference
    from lorakit.tasks.preference import Preference, PreferenceDataConfig, PreferenceTrainConfig

    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="lorakit-dpo-levers-") as tmp:
        folder = model_folder("smollm2", Path(tmp))
        pairs = write_pairs(Path(tmp) / "pairs.jsonl", BATCH * args.batches)
        raw = load_dataset("json", data_files=str(pairs), split="train")
    tok = AutoTokenizer.from_pretrained(folder)
    task = Preference()
    task.train_cfg = PreferenceTrainConfig(beta=0.1)
    d = PreferenceDataConfig(train="x", max_length=MAX_LENGTH)
    encoded, _ = task._encode_split(raw, tok, d, key="pairs")
    collate = task.collate(tok, d, train=True)
    batches = [collate([encoded[i] for i in range(k * BATCH, (k + 1) * BATCH)]) for k in range(args.batches)]
    torch.manual_seed(0)
    model = apply_lora(
        AutoModelForCausalLM.from_pretrained(folder),
        LoraSettings(r=R, alpha=ALPHA, dropout=0.0, target_modules=TARGETS),
        task_type="CAUSAL_LM",
        new_modules=[],
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    starts = [preference.shared_prompt_starts(model, b) for b in batches]
    prompts = sum(int(s[: len(s) // 2].sum()) for s in starts if s is not None)
    print(
        f"# SmolLM2-135M-Instruct, {args.batches} batches of {BATCH} pairs; tokens per pass: whole rows "
        f"{real}, shared prompts {real - prompts} ({(real - prompts) / real:.2f}x); torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    shared_fn = preference.shared_prompt_starts

    def set_mode(mode: str) -> None:
        preference.shared_prompt_starts = shared_fn if mode == "shared" else (lambda m, b: None)

    def steps(mode: str, amp: torch.dtype | None) -> float:
        set_mode(mode)
        t0 = time.perf_counter()
        for batch in batches:
            with autocast(cpu, amp):
                loss = task.loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - t0) / len(batches)

    losses = {}
    for mode in ("shared", "plain"):
        set_mode(mode)
        with torch.no_grad():
            losses[mode] = float(task.loss(model, batches[0]))
    print(f"loss on batch 0 (fp32): shared {losses['shared']:.7f}, plain {losses['plain']:.7f}")
    configs = [(m, p) for p in ("fp32", "bf16") for m in ("shared", "plain")]
    best = dict.fromkeys(configs, float("inf"))
    for r in range(args.rounds):
        for mode, prec in configs:
            best[mode, prec] = min(best[mode, prec], steps(mode, torch.bfloat16 if prec == "bf16" else None))
            print(f"  round {r}: {mode} {prec}: {best[mode, prec]:.2f} s/step (best so far)", flush=True)
    set_mode("shared")
    for prec in ("fp32", "bf16"):
        s, p = best["shared", prec], best["plain", prec]
        print(f"{prec}: shared prompt {s:.2f} s/step, whole rows {p:.2f} s/step ({s / p:.2f}x)")


if __name__ == "__main__":
    main()
