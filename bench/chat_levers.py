"""Causal-LM speed levers on the chat demo's own data and model, measured on steps alone.

The data, model and LoRA adapter of configs/rt-smollm2-chat.yaml (SmolLM2-135M-Instruct, r=16 on the
seven projections, batches of 16 reviews in chat form), built by lorakit itself.

  head      a training step (forward, backward, AdamW step; bf16 autocast) with the vocabulary
            projection over every position (transformers' own loss) against lorakit's loss, which
            runs it on the answer positions only (``logits_to_keep``); the same 8 batches,
            interleaved, best of ``--rounds``; the two losses on one batch
  attention a training step with transformers' SDPA in bf16 (PyTorch's CPU flash-attention kernel)
            against lorakit's training attention (the same kernel in fp32 for passes that will be
            differentiated: ``modeling.use_fp32_training_attention``); the same 8 batches, interleaved,
            best of ``--rounds``; each one's bf16 loss against the fp32 loss on 8 batches
  kernel    PyTorch's CPU SDPA kernel alone, bf16 against fp32 inputs, forward + backward and forward
            alone, at the chat demo's shape (16 x 9 heads x 96 tokens x 64, causal) and MiniLM's
            (16 x 12 x 256 x 32, padding mask); best of 3 rounds of 5
  generate  greedy answers (4 new tokens) to 64 held-out prompts in batches of 32: fp32 against
            bf16 autocast, and the share of identical answers

    .venv/bin/python bench/chat_levers.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

import torch

CPU = torch.device("cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/rt-smollm2-chat.yaml")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from lorakit.adapters.build import build_model, open_base, resolve_config
    from lorakit.config.loading import load_config
    from lorakit.data.batching import take
    from lorakit.tasks import get_task

    cfg = load_config(args.config)
    task = get_task(cfg.task)
    cfg = resolve_config(cfg, task, CPU)
    base = open_base(task, cfg.model)
    data = task.prepare(cfg, base.processor)
    torch.manual_seed(0)
    model = build_model(task, cfg, base, data.label_space)
    collate = task.collate(base.processor, cfg.data, train=True)
    batches = [collate(take(data.splits["train"], list(range(i * 16, i * 16 + 16)))) for i in range(8)]
    print(
        f"# {args.config}: batches of 16, widths {[b['input_ids'].shape[1] for b in batches]}, answer tokens "
        f"{[int((b['labels'][:, 1:] != -100).sum()) for b in batches]}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    kernel_lever()
    head_lever(task, model, batches, args.rounds)
    attention_lever(task, model, batches, args.rounds)
    generation_lever(task, model, base.processor, data.splits["test"])


def steps(model, batches, loss_fn) -> float:
    """Seconds per training step (bf16 autocast, AdamW) over ``batches``."""
    from lorakit.data.batching import autocast

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    t0 = time.perf_counter()
    for batch in batches:
        with autocast(CPU, torch.bfloat16):
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - t0) / len(batches)


def best_of(rounds: int, model, batches, variants: dict) -> dict[str, float]:
    """Best seconds per step of each variant (a function that sets it up and returns its loss
    function), the variants interleaved round by round."""
    best = dict.fromkeys(variants, float("inf"))
    for r in range(rounds):
        for name, variant in variants.items():
            best[name] = min(best[name], steps(model, batches, variant()))
            print(f"  round {r}: {name}: {best[name]:.2f} s/step (best so far)", flush=True)
    return best


def kernel_ms(qkv: list, mask, causal: bool, dtype: torch.dtype, backward: bool) -> float:
    """Best milliseconds of one SDPA call (and its backward) over 3 rounds of 5."""
    import torch.nn.functional as F

    q, k, v = (t.to(dtype).requires_grad_(backward) for t in qkv)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(5):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            if backward:
                out.sum().backward()
        best = min(best, (time.perf_counter() - t0) / 5 * 1000)
    return best


def kernel_lever() -> None:
    torch.manual_seed(0)
    for name, (b, h, n, d), causal in (("chat", (16, 9, 96, 64), True), ("MiniLM", (16, 12, 256, 32), False)):
        qkv = [torch.randn(b, h, n, d).bfloat16() for _ in range(3)]
        mask = None if causal else (torch.rand(b, 1, 1, n) > 0.2).expand(b, 1, n, n)
        both = [kernel_ms(qkv, mask, causal, dt, True) for dt in (torch.bfloat16, torch.float32)]
        fwd = [kernel_ms(qkv, mask, causal, dt, False) for dt in (torch.bfloat16, torch.float32)]
        print(
            f"SDPA kernel, {name} shape: forward + backward bf16 {both[0]:.1f} ms, fp32 {both[1]:.1f} ms "
            f"({both[1] / both[0]:.2f}x); forward alone bf16 {fwd[0]:.1f} ms, fp32 {fwd[1]:.1f} ms "
            f"({fwd[1] / fwd[0]:.2f}x)",
            flush=True,
        )


def head_lever(task, model, batches, rounds: int) -> None:
    from lorakit.data.batching import autocast

    def full(m, b):
        return m(**b).loss

    with torch.no_grad(), autocast(CPU, torch.bfloat16):
        a, b = float(full(model, batches[0])), float(task.loss(model, batches[0]))
    print(f"loss on batch 0 (bf16): every position {a:.7f}, answer positions only {b:.7f}")
    best = best_of(
        rounds, model, batches, {"every position": lambda: full, "answer positions only": lambda: task.loss}
    )
    every, only = best["every position"], best["answer positions only"]
    print(
        f"training step, head on every position {every:.2f} s, on answer positions only "
        f"{only:.2f} s ({only / every:.2f}x)"
    )


def attention_lever(task, model, batches, rounds: int) -> None:
    from lorakit.data.batching import autocast
    from lorakit.models import modeling

    inner = model.get_base_model()

    def bf16_sdpa():
        inner.set_attn_implementation("sdpa")
        return task.loss

    def fp32_training_attention():
        modeling.use_fp32_training_attention(model, CPU, torch.bfloat16)
        return task.loss

    variants = {"bf16 SDPA": bf16_sdpa, "fp32 training attention": fp32_training_attention}
    with torch.no_grad():
        exact = [float(task.loss(model, b)) for b in batches]
        bias = {}
        for name, variant in variants.items():
            variant()
            with autocast(CPU, torch.bfloat16), torch.enable_grad():  # grad on: the training path
                got = [float(task.loss(model, b).detach()) for b in batches]
            bias[name] = sum(g - e for g, e in zip(got, exact, strict=True)) / len(got)
    print(
        "bf16 loss minus fp32 loss, mean of 8 batches: " + ", ".join(f"{k} {v:+.4f}" for k, v in bias.items())
    )
    best = best_of(rounds, model, batches, variants)
    sdpa, fp32 = best["bf16 SDPA"], best["fp32 training attention"]
    print(
        f"training step, attention bf16 {sdpa:.2f} s, fp32 when differentiated {fp32:.2f} s "
        f"({fp32 / sdpa:.2f}x)"
    )
    inner.set_attn_implementation("sdpa")


def generation_lever(task, model, processor, test) -> None:
    from lorakit.data.batching import autocast

    model.eval()
    prompts = test.select(range(64))["prompt_ids"]
    outs, times = {}, {}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        t0 = time.perf_counter()
        with autocast(CPU, amp):
            outs[name] = task.generate_ids(model, processor, prompts, max_new_tokens=4, batch_size=32)
        times[name] = time.perf_counter() - t0
    same = sum(x == y for x, y in zip(outs["fp32"], outs["bf16"], strict=True)) / len(prompts)
    print(
        f"generation, 64 prompts: fp32 {times['fp32']:.1f} s, bf16 autocast {times['bf16']:.1f} s "
        f"({times['bf16'] / times['fp32']:.2f}x); identical answers {same:.0%} (adapter untrained: "
        "the base model's answers)"
    )


if __name__ == "__main__":
    main()
