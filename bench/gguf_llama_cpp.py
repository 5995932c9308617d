"""`lorakit export --gguf` files answered by llama.cpp itself (llama-cpp-python), not only by transformers.

For a causal-LM adapter it exports the merged model (f16 or q8_0) and the LoRA file, writes the base model
as GGUF with the same writer, then asks llama.cpp:

- tokens: llama.cpp's tokenizer (from the file's metadata) on the check prompts vs the adapter's ids;
- logits: llama.cpp's at every prompt position vs the unmerged adapter's (PyTorch, float32);
- LoRA: base GGUF + lora GGUF in llama.cpp vs the merged GGUF in llama.cpp.

Usage (llama-cpp-python must be importable; it builds from source, ~20+ minutes on 2 cores):
    python bench/gguf_llama_cpp.py ADAPTER OUT_DIR [--gguf-type f16|q8_0] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter")
    ap.add_argument("out")
    ap.add_argument("--gguf-type", default="f16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from llama_cpp import Llama

    from lorakit.gguf_export import export_gguf, write_llama_gguf
    from lorakit.loader import load_adapter

    out = Path(args.out)
    r = export_gguf(args.adapter, out / "export", gguf_type=args.gguf_type, overwrite=True)
    loaded = load_adapter(args.adapter, device="cpu")
    batches = loaded.task.export_batches(loaded.processor, loaded.data_cfg)
    prompts = [
        row[mask.bool()].tolist()
        for b in batches[:1]
        for row, mask in zip(b["input_ids"], b["attention_mask"], strict=True)
    ]
    with torch.no_grad():
        want = [loaded.model(input_ids=torch.tensor([p])).logits[0].numpy() for p in prompts]
    # The base alone (LoRA layers removed, nothing merged) as GGUF with the same writer, for llama.cpp's --lora.
    base = loaded.model.unload()
    hf = out / "base-hf"
    loaded.task.save_merged(base, hf, loaded)
    from transformers import AutoTokenizer

    write_llama_gguf(
        base, AutoTokenizer.from_pretrained(hf), hf, out / "base-f16.gguf", gguf_type="f16", name="base"
    )

    merged = Llama(model_path=str(r.model_file), logits_all=True, n_ctx=512, verbose=False)
    with_lora = (
        Llama(
            model_path=str(out / "base-f16.gguf"),
            lora_path=str(r.lora_file),
            logits_all=True,
            n_ctx=512,
            verbose=False,
        )
        if r.lora_file
        else None
    )
    report = {
        "gguf_type": args.gguf_type,
        "prompts": len(prompts),
        "tokens_equal": True,
        "max_abs_logit_diff": 0.0,
        "max_abs_logit": 0.0,
        "top1_agreement": 0.0,
        "lora_vs_merged_max_abs_diff": None,
    }
    same = total = 0
    for ids, ref in zip(prompts, want, strict=True):
        text = loaded.processor.decode(ids, skip_special_tokens=False)
        report["tokens_equal"] &= merged.tokenize(text.encode(), add_bos=False, special=True) == ids
        merged.reset()
        merged.eval(ids)
        got = np.array(merged.scores[: len(ids)])
        report["max_abs_logit_diff"] = max(report["max_abs_logit_diff"], float(np.abs(got - ref).max()))
        report["max_abs_logit"] = max(report["max_abs_logit"], float(np.abs(ref).max()))
        same += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
        if with_lora is not None:
            with_lora.reset()
            with_lora.eval(ids)
            d = float(np.abs(np.array(with_lora.scores[: len(ids)]) - got).max())
            report["lora_vs_merged_max_abs_diff"] = max(report["lora_vs_merged_max_abs_diff"] or 0.0, d)
    report["top1_agreement"] = same / total
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
