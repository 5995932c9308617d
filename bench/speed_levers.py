"""Training-speed levers of issue 8, measured on training steps alone (no lorakit import).

Model: the packaged MiniLM with LoRA as lorakit's defaults build it (r=8, alpha 16, every linear layer
of the six blocks, no dropout anywhere, the head trained fully). Data: 8 batches of 16 real IMDB
reviews padded to changing lengths (256, 224, 192, 256, 160, 256, 128, 224 tokens), as length-grouped
batches come. A step = forward, backward, AdamW step.

  compile   eager steps against ``torch.compile(model, dynamic=True)`` (inductor, C++ on CPU): the
            first round (compilation included) and the steady rounds after it; each mode in its
            own process: ``--mode eager`` / ``--mode dynamic`` / ``--mode default``
  cache     the frozen-layer activation cache: LoRA on all six blocks, on the top three only
            (peft ``layers_to_transform``; the backward pass stops at block 3), and the top three
            fed from cached block-3 inputs (embeddings and blocks 0-2 skipped, as a cache would from
            the second epoch on). Checks the cached model computes the top-3 model's logits, then
            times the three interleaved, best of ``--rounds``.

  precision fp32 steps against bf16 autocast steps (``torch.autocast("cpu", torch.bfloat16)``, as
            ``train.mixed_precision: bf16`` runs them), interleaved, best of ``--rounds``; the dense
            2048x2048 matmul rate in both; the largest logit difference on one batch
  threads   torch's intra-op threads: 1 against every core, fp32 and bf16, interleaved
  padding   one pass over 256 reviews (16 batches of 16, at most 256 tokens): every batch padded to
            256 tokens; random batches padded to their longest review (``DataCollatorWithPadding``,
            the reference recipe); length-grouped batches padded to their longest (lorakit); and the
            tokenizer's time for 2,000 reviews (what caching the tokenised data saves per epoch)

    .venv/bin/python bench/speed_levers.py compile --mode eager
    .venv/bin/python bench/speed_levers.py compile --mode dynamic
    .venv/bin/python bench/speed_levers.py cache
    .venv/bin/python bench/speed_levers.py precision
    .venv/bin/python bench/speed_levers.py threads
    .venv/bin/python bench/speed_levers.py padding [--bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

LENGTHS = (256, 224, 192, 256, 160, 256, 128, 224)
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def build(layers: list[int] | None = None):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_pretrained(
        common.minilm_path(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=TARGETS,
        modules_to_save=["classifier"],
        layers_to_transform=layers,
        layers_pattern="layer" if layers else None,
    )
    return get_peft_model(m, cfg)


def batches():
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(common.minilm_path())
    texts, labels = reviews(16 * len(LENGTHS))
    labels = torch.tensor(labels)
    return [
        (
            tok(
                texts[i * 16 : (i + 1) * 16],
                truncation=True,
                max_length=n,
                padding="max_length",
                return_tensors="pt",
            ),
            labels[i * 16 : (i + 1) * 16],
        )
        for i, n in enumerate(LENGTHS)
    ]


def reviews(n: int) -> tuple[list[str], list[int]]:
    import csv
    import itertools

    with common.reviews_csv().open(newline="", encoding="utf-8") as fh:
        rows = list(itertools.islice(csv.DictReader(fh), n))
    return [r["text"] for r in rows], [int(r["label"]) for r in rows]


def steps(model, opt, data, feed=None, amp=None) -> float:
    import torch

    t = time.perf_counter()
    for i, (enc, y) in enumerate(data):
        if feed is not None:
            feed(i)
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = model(**enc, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def optimizer(model):
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def compile_lever(mode: str, rounds: int) -> dict:
    import torch

    data = batches()
    model = build()
    model.train()
    opt = optimizer(model)
    out: dict = {"mode": mode}
    if mode != "eager":
        t = time.perf_counter()
        model = torch.compile(model, dynamic=True if mode == "dynamic" else None)
        steps(model, opt, data)
        out["first_round_s"] = round(time.perf_counter() - t, 1)
    else:
        steps(model, opt, data)
    took = sum(steps(model, opt, data) for _ in range(rounds))
    tokens = sum(int(e["input_ids"].numel()) for e, _ in data) * rounds
    return out | {"steady_s": round(took, 2), "tokens_per_s": round(tokens / took, 1)}


def cache_lever(rounds: int) -> dict:
    import torch
    from torch import nn

    class Given(nn.Module):  # stands in for the embeddings: returns the cached block-3 input
        def __init__(self) -> None:
            super().__init__()
            self.h = None

        def forward(self, *args, **kwargs):
            return self.h

    data = batches()
    full, top, cached = build(), build([3, 4, 5]), build([3, 4, 5])
    bert = cached.base_model.model.bert
    t = time.perf_counter()
    store = []

    class Stored(Exception):
        pass

    def grab(module, args, kwargs):  # block 3's input is stored; the blocks above are not run
        store.append(args[0] if args else kwargs["hidden_states"])
        raise Stored

    hook = bert.encoder.layer[3].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():  # the cache: what the first epoch would store
        for enc, _ in data:
            with contextlib.suppress(Stored):
                cached(**enc)
    hook.remove()
    fill = time.perf_counter() - t
    given = Given()
    bert.embeddings = given
    bert.encoder.layer = nn.ModuleList(list(bert.encoder.layer[3:]))

    def feed(i: int) -> None:
        given.h = store[i]

    with torch.no_grad():
        top.eval(), cached.eval(), feed(0)
        diff = (top(**data[0][0]).logits - cached(**data[0][0]).logits).abs().max().item()
        top.train(), cached.train()
    models = {"full": full, "top3": top, "top3-cached": cached}
    runs = {
        k: (lambda m=m, opt=optimizer(m), k=k: steps(m, opt, data, feed if k == "top3-cached" else None))
        for k, m in models.items()
    }
    return interleaved(runs, rounds) | {
        "max_logit_diff_cached_vs_top3": diff,
        "cache_fill_s": round(fill, 2),
        "cache_MB": round(sum(h.numel() * 4 for h in store) / 2**20, 1),
        "threads": torch.get_num_threads(),
    }


def interleaved(runs: dict, rounds: int) -> dict:
    """Time each named zero-argument run once per round, in turn; best and median seconds."""
    res: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            res[k].append(run())
    best = {k: min(v) for k, v in res.items()}
    median = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
    first = next(iter(runs))
    return {
        "round_s_best": {k: round(v, 2) for k, v in best.items()},
        "vs_" + first: {k: round(v / best[first], 3) for k, v in best.items()},
        "median_vs_" + first: {k: round(v / median[first], 3) for k, v in median.items()},
        "rounds": {k: [round(x, 2) for x in v] for k, v in res.items()},
    }


def precision_lever(rounds: int) -> dict:
    import torch

    data = batches()
    model = build()
    with torch.no_grad():
        fp32 = model(**data[0][0]).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(**data[0][0]).logits.float()
    model.train()
    opt = optimizer(model)
    steps(model, opt, data[:2]), steps(model, opt, data[:2], amp=torch.bfloat16)  # warm-up
    out = interleaved(
        {
            "fp32": lambda: steps(model, opt, data),
            "bf16": lambda: steps(model, opt, data, amp=torch.bfloat16),
        },
        rounds,
    )
    return out | {
        "max_logit_diff_bf16_vs_fp32": round((fp32 - bf16).abs().max().item(), 4),
        "logit_scale": round(fp32.abs().max().item(), 3),
        "matmul_gflops": {k: round(common.matmul_flops(k) / 1e9, 1) for k in ("fp32", "bf16")},
        "native_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
        "threads": torch.get_num_threads(),
    }


def threads_lever(rounds: int) -> dict:
    import torch

    data = batches()[:4]
    model = build()
    model.train()
    opt = optimizer(model)
    cores = torch.get_num_threads()

    def run(n: int, amp=None):
        def go() -> float:
            torch.set_num_threads(n)
            try:
                return steps(model, opt, data, amp=amp)
            finally:
                torch.set_num_threads(cores)

        return go

    steps(model, opt, data[:1])
    runs = {
        f"fp32-{cores}": run(cores),
        "fp32-1": run(1),
        f"bf16-{cores}": run(cores, torch.bfloat16),
        "bf16-1": run(1, torch.bfloat16),
    }
    return interleaved(runs, rounds) | {"cores": cores}


def padding_lever(rounds: int, bf16: bool) -> dict:
    import random

    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(common.minilm_path())
    texts, labels = reviews(2000)
    t = time.perf_counter()
    ids = tok(texts, truncation=True, max_length=256)["input_ids"]
    tokenize_s = time.perf_counter() - t
    ids, labels = ids[:256], labels[:256]
    order = list(range(len(ids)))
    random.Random(0).shuffle(order)
    by_length = sorted(order, key=lambda i: len(ids[i]))  # one mega-batch: 256 reviews sorted, then cut

    def make(idx: list[int], pad_to: int | None):
        out = []
        for k in range(0, len(idx), 16):
            rows = [{"input_ids": ids[i]} for i in idx[k : k + 16]]
            enc = tok.pad(
                rows, padding="max_length" if pad_to else "longest", max_length=pad_to, return_tensors="pt"
            )
            out.append((enc, torch.tensor([labels[i] for i in idx[k : k + 16]])))
        random.Random(1).shuffle(out)  # grouped batches still come in random order
        return out

    schemes = {
        "pad-to-256": make(order, 256),
        "random-longest": make(order, None),
        "grouped-longest": make(by_length, None),
    }
    model = build()
    model.train()
    opt = optimizer(model)
    amp = torch.bfloat16 if bf16 else None
    steps(model, opt, schemes["random-longest"][:2], amp=amp)
    out = interleaved({k: (lambda d=d: steps(model, opt, d, amp=amp)) for k, d in schemes.items()}, rounds)
    real = sum(len(i) for i in ids)
    return out | {
        "tokens": {k: sum(int(e["input_ids"].numel()) for e, _ in d) for k, d in schemes.items()},
        "real_tokens": real,
        "tokenize_2000_reviews_s": round(tokenize_s, 2),
        "precision": "bf16" if bf16 else "fp32",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lever", choices=["compile", "cache", "precision", "threads", "padding"])
    ap.add_argument("--bf16", action="store_true", help="padding: the steps under bf16 autocast")
    ap.add_argument(
        "--mode", choices=["eager", "dynamic", "default"], default="eager", help="compile: how the model runs"
    )
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (compile: 2, the others: 3)")
    args = ap.parse_args()
    levers = {
        "compile": lambda: compile_lever(args.mode, args.rounds or 2),
        "cache": lambda: cache_lever(args.rounds or 3),
        "precision": lambda: precision_lever(args.rounds or 3),
        "threads": lambda: threads_lever(args.rounds or 3),
        "padding": lambda: padding_lever(args.rounds or 3, args.bf16),
    }
    print(json.dumps(levers[args.lever]()), flush=True)


if __name__ == "__main__":
    main()
