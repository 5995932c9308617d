"""Causal-LM speed levers on the chat demo's own data and model, measured on steps alone.

The data, model and LoRA adapter of configs/rt-smollm2-chat.yaml (SmolLM2-135M-Instruct, r=16 on the
seven projections, batches of 16 reviews in chat form), built by lorakit itself.

  head      a training step (forward, backward, AdamW step; bf16 autocast) with the vocabulary
            projection over every position (transformers' own loss) against lorakit's loss, which
            runs it on the answer positions only (``logits_to_keep``); the same 4 batches,
            interleaved, best of ``--rounds``; the two losses on one batch
  generate  greedy answers (4 new tokens) to 64 held-out prompts in batches of 32: fp32 against
            bf16 autocast, and the share of identical answers

    .venv/bin/python bench/chat_levers.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/rt-smollm2-chat.yaml")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from lorakit.batching import autocast, take
    from lorakit.build import build_model, open_base, resolve_config
    from lorakit.config import load_config
    from lorakit.tasks import get_task

    cpu = torch.device("cpu")
    cfg = load_config(args.config)
    task = get_task(cfg.task)
    cfg = resolve_config(cfg, task, cpu)
    base = open_base(task, cfg.model)
    data = task.prepare(cfg, base.processor)
    torch.manual_seed(0)
    model = build_model(task, cfg, base, data.label_space)
    collate = task.collate(base.processor, cfg.data, train=True)
    batches = [collate(take(data.splits["train"], list(range(i * 16, i * 16 + 16)))) for i in range(4)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    print(
        f"# {args.config}: batches of 16, widths {[b['input_ids'].shape[1] for b in batches]}, answer tokens "
        f"{[int((b['labels'][:, 1:] != -100).sum()) for b in batches]}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )

    def full(m, b):
        return m(**b).loss

    def answers_only(m, b):
        return task.loss(m, b)

    with torch.no_grad(), autocast(cpu, torch.bfloat16):
        a, b = float(full(model, batches[0])), float(answers_only(model, batches[0]))
    print(f"loss on batch 0 (bf16): every position {a:.7f}, answer positions only {b:.7f}")

    def steps(fn) -> float:
        t0 = time.perf_counter()
        for batch in batches:
            with autocast(cpu, torch.bfloat16):
                loss = fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - t0) / len(batches)

    best = {"every position": float("inf"), "answer positions only": float("inf")}
    for r in range(args.rounds):
        for name, fn in (("every position", full), ("answer positions only", answers_only)):
            best[name] = min(best[name], steps(fn))
            print(f"  round {r}: {name}: {best[name]:.2f} s/step (best so far)", flush=True)
    every, only = best["every position"], best["answer positions only"]
    print(
        f"training step, head on every position {every:.2f} s, on answer positions only "
        f"{only:.2f} s ({only / every:.2f}x)"
    )

    model.eval()
    prompts = data.splits["test"].select(range(64))["prompt_ids"]
    outs, times = {}, {}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        t0 = time.perf_counter()
        with autocast(cpu, amp):
            outs[name] = task.generate_ids(model, base.processor, prompts, max_new_tokens=4, batch_size=32)
        times[name] = time.perf_counter() - t0
    same = sum(x == y for x, y in zip(outs["fp32"], outs["bf16"], strict=True)) / len(prompts)
    print(
        f"generation, 64 prompts: fp32 {times['fp32']:.1f} s, bf16 autocast {times['bf16']:.1f} s "
        f"({times['bf16'] / times['fp32']:.2f}x); identical answers {same:.0%} (adapter untrained: "
        "the base model's answers)"
    )


if __name__ == "__main__":
    main()
