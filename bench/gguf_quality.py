"""Exact match of the chat demo's adapter exported as GGUF (f16 and q8_0) and read back by an
independent reader, against the unmerged adapter, on the demo's held-out test set.

    make demo-chat                                   # trains runs/rt-smollm2-chat (about 6 min)
    .venv/bin/python bench/gguf_quality.py [--run runs/rt-smollm2-chat] [--types f16 q8_0]

For each type this is ``lorakit export RUN --gguf DIR --gguf-type TYPE --score-test``: the merged model
written and checked as the CLI does, then the run's test split answered greedily in float32 by the
unmerged adapter and by the file loaded with transformers' GGUF loader (which dequantises q8_0 to
float32), with the same generation code. The only difference between the two is the file's weights.
Printed: each exact match, the difference in points, the share of identical answers, the file size.
Issue 27's bar: q8_0 within 1 point of the adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/rt-smollm2-chat"))
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    if not (args.run / "lorakit.json").is_file() and not (args.run / "adapter" / "lorakit.json").is_file():
        sys.exit(f"{args.run}: no trained run here; run `make demo-chat` first")

    from lorakit.export.gguf import export_gguf

    rows = []
    with tempfile.TemporaryDirectory(prefix="lorakit-gguf-quality-") as tmp:
        for kind in args.types:
            started = time.perf_counter()
            r = export_gguf(args.run, Path(tmp) / kind, gguf_type=kind, lora=False, score_test=True)
            sc = r.scored or {}
            rows.append(
                {
                    "type": kind,
                    **sc,
                    "file_mib": round(r.model_file.stat().st_size / 2**20, 1),
                    "max_abs_logit_diff": r.logit_diff,
                    "max_abs_logit": r.logit_scale,
                    "top1_agreement": r.top1_agreement,
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            print(
                f"{kind}: exact match on {sc['examples']} held-out examples: adapter {sc['adapter']:.2%}, "
                f"GGUF {sc['gguf']:.2%} ({100 * (sc['gguf'] - sc['adapter']):+.2f} points); identical "
                f"answers {sc['identical_answers']:.1%}; file {rows[-1]['file_mib']:.0f} MiB; export "
                f"check: largest |logit diff| {r.logit_diff:.3g} of {r.logit_scale:.3g}, same next token "
                f"at {r.top1_agreement:.1%} ({rows[-1]['seconds']:.0f} s)",
                flush=True,
            )
    result = {"run": str(args.run), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
