"""Exact match of the chat demo's adapter exported as GGUF (f16 and q8_0) and read back by an
independent reader, against the unmerged adapter, on the demo's held-out test set.

    make demo-chat                                   # trains runs/rt-smollm2-chat (about 6 min)
    .venv/bin/python bench/gguf_quality.py [--run runs/rt-smollm2-chat] [--types f16 q8_0]

For each type: ``lorakit export RUN --gguf DIR --gguf-type TYPE`` (the merged model; its own logit check
runs as in the CLI), then the file is loaded with transformers' GGUF loader (which dequantises q8_0 to
float32) and answers the same prompts greedily with the same generation code as the adapter. Everything
runs in float32 (no autocast), so the only difference between the rows is the file's weights.
Prints the exact match of each, the difference in points, and the share of answers that are identical.
Issue 27's bar: q8_0 within 1 point of the adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit


def answers(task, model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    return task.generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=32)


def exact_match(refs: list[str], outs: list[str]) -> float:
    from lorakit.tasks.causal_lm import normalise_answer

    return sum(normalise_answer(r) == normalise_answer(o) for r, o in zip(refs, outs, strict=True)) / len(
        refs
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/rt-smollm2-chat"))
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    if not (args.run / "adapter").is_dir() and not (args.run / "lorakit.json").is_file():
        sys.exit(f"{args.run}: no trained run here; run `make demo-chat` first")

    from transformers import AutoModelForCausalLM

    from lorakit.build import load_adapter
    from lorakit.gguf_export import export_gguf
    from lorakit.tasks.text_classification import quiet_transformers

    torch.manual_seed(0)
    loaded = load_adapter(args.run, device="cpu")
    task, tok, cfg = loaded.task, loaded.processor, loaded.config
    test = task.prepare(cfg, tok).splits["test"]
    refs, prompts = test["reference"], test["prompt_ids"]
    new_tokens = cfg.train.max_new_tokens
    started = time.perf_counter()
    base_outs = answers(task, loaded.model.eval(), tok, prompts, new_tokens)
    rows = [{"name": "adapter (unmerged, peft)", "exact_match": exact_match(refs, base_outs), "same": 1.0}]
    print(
        f"adapter: exact match {rows[0]['exact_match']:.2%} on {len(refs)} held-out examples "
        f"({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="lorakit-gguf-quality-") as tmp:
        for kind in args.types:
            out = Path(tmp) / kind
            r = export_gguf(args.run, out, gguf_type=kind, lora=False)
            with quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(
                    str(out), gguf_file=r.model_file.name, dtype=torch.float32
                ).eval()
            outs = answers(task, model, tok, prompts, new_tokens)
            size = (out / r.model_file.name).stat().st_size / 2**20
            row = {
                "name": f"GGUF {kind} (merged, read back by transformers)",
                "exact_match": exact_match(refs, outs),
                "same": sum(a == b for a, b in zip(outs, base_outs, strict=True)) / len(outs),
                "file_mib": round(size, 1),
                "export_check": {
                    k: v for k, v in r.to_dict().items() if "logit" in k or k == "top1_agreement"
                },
            }
            rows.append(row)
            print(
                f"{kind}: exact match {row['exact_match']:.2%} "
                f"({100 * (row['exact_match'] - rows[0]['exact_match']):+.2f} points), "
                f"identical answers {row['same']:.1%}, file {size:.0f} MiB",
                flush=True,
            )
            del model
    for row in rows:
        print(
            f"  {row['name']:48s} exact match {row['exact_match']:.2%}   identical answers {row['same']:.1%}"
        )
    result = {"run": str(args.run), "examples": len(refs), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    emit(result)


if __name__ == "__main__":
    main()
