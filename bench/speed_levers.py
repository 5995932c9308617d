"""Two training-speed levers of issue 8, measured on training steps alone (no lorakit import).

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

    .venv/bin/python bench/speed_levers.py compile --mode eager
    .venv/bin/python bench/speed_levers.py compile --mode dynamic
    .venv/bin/python bench/speed_levers.py cache
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
    m = AutoModelForSequenceClassification.from_pretrained(common.minilm_path(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, modules_to_save=["classifier"],
                     layers_to_transform=layers, layers_pattern="layer" if layers else None)
    return get_peft_model(m, cfg)


def batches():
    import csv
    import itertools

    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(common.minilm_path())
    with common.reviews_csv().open(newline="", encoding="utf-8") as fh:
        rows = list(itertools.islice(csv.DictReader(fh), 16 * len(LENGTHS)))
    texts, labels = [r["text"] for r in rows], torch.tensor([int(r["label"]) for r in rows])
    return [(tok(texts[i * 16:(i + 1) * 16], truncation=True, max_length=n, padding="max_length", return_tensors="pt"), labels[i * 16:(i + 1) * 16])
            for i, n in enumerate(LENGTHS)]


def steps(model, opt, data, feed=None) -> float:
    t = time.perf_counter()
    for i, (enc, y) in enumerate(data):
        if feed is not None:
            feed(i)
        model(**enc, labels=y).loss.backward()
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
    opts = {k: optimizer(m) for k, m in models.items()}
    res: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            res[k].append(steps(m, opts[k], data, feed if k == "top3-cached" else None))
    best = {k: min(v) for k, v in res.items()}
    median = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
    return {"median_vs_full": {k: round(v / median["full"], 3) for k, v in median.items()},"max_logit_diff_cached_vs_top3": diff, "cache_fill_s": round(fill, 2), "cache_MB": round(sum(h.numel() * 4 for h in store) / 2**20, 1),
            "round_s_best": {k: round(v, 2) for k, v in best.items()}, "vs_full": {k: round(v / best["full"], 3) for k, v in best.items()},
            "rounds": {k: [round(x, 2) for x in v] for k, v in res.items()}, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lever", choices=["compile", "cache"])
    ap.add_argument("--mode", choices=["eager", "dynamic", "default"], default="eager", help="compile: how the model runs")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds of the 8 batches (compile: 2, cache: 3)")
    args = ap.parse_args()
    if args.lever == "compile":
        print(json.dumps(compile_lever(args.mode, args.rounds or 2)), flush=True)
    else:
        print(json.dumps(cache_lever(args.rounds or 3)), flush=True)


if __name__ == "__main__":
    main()
