"""A "nothing changed for users" fingerprint of every shipped config (configs/*.yaml).

Trains each shipped config, reduced in size with ``--set``, through the ``lorakit`` command line only
(``lorakit train CONFIG --set k=v ... --overwrite`` in a subprocess), so the same script runs unchanged
against a restructured lorakit. Per config it records:

- ``adapter_sha256``: sha256 of ``adapter/adapter_model.safetensors`` (the trained weights, byte for byte);
- ``metrics``: ``metrics.json`` without its timings (``seconds``, ``train_seconds``): best metric, the
  validation / test / base-model scores (scalars, per-class rows, confusion matrices, generated samples),
  steps, data sizes, precision and the trainable / total parameter counts;
- ``base_model_fingerprint``: the base model's hash as ``adapter/lorakit.json`` records it (checks that
  the stand-in ViT and the packaged models are the same bytes);
- ``history``: every row of ``history.jsonl`` (train losses and learning rates, validation scores)
  without ``seconds``.

Runtimes and versions go under ``meta`` and are never compared. Before / after a refactor:

    .venv/bin/python bench/fingerprint.py --out bench/results/before.json
    .venv/bin/python bench/fingerprint.py --out /tmp/after.json --compare bench/results/before.json

``--compare`` prints per config whether the adapter bytes are identical and the largest absolute
difference of any metric or loss, and exits 1 on any difference (2 when a run fails).

Determinism: every run pins ``train.num_threads`` (CPU kernels split their reductions by thread count,
so another count gives other float sums) and ``train.device=cpu``; the precision stays as each config
says (``auto`` = bf16 autocast on CPUs with native bf16). Compare runs made on the same machine type.

configs/vit-food101-brief.yaml needs the Hub: the script builds a seeded tiny random ViT (hidden 32,
2 layers, 32x32 input) with its image processor and a seeded image folder in the work folder, and points
the config at them (fp32: fp16 needs a GPU); everything else of that config stays.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VOLATILE_KEYS = {"seconds", "train_seconds"}  # wall-clock timings: never part of the fingerprint

# Per config: the --set overrides that make it small (each still evaluates at least twice, selects the
# best adapter and scores a test split). Paths under the work folder are filled in by `overrides_for`.
REDUCED: dict[str, list[str]] = {
    "imdb-minilm": [
        *("data.max_train_samples=48", "data.validation_size=16", "data.test_size=16", "data.max_length=64"),
        *("train.batch_size=8", "train.epochs=1", "train.eval_every_steps=3", "train.logging_steps=2"),
        "train.save_every_steps=4",
    ],
    "fashion-mnist-efficientnet": [
        *(
            "data.max_train_samples=48",
            "data.validation_size=16",
            "data.max_eval_samples=16",
            "data.image_size=32",
        ),
        *("train.batch_size=8", "train.eval_batch_size=16", "train.epochs=1", "train.eval_every_steps=3"),
        *("train.logging_steps=2", "train.save_every_steps=4"),
    ],
    "rt-smollm2-chat": [
        *("data.max_train_samples=16", "data.validation_size=4", "data.test_size=4", "data.max_length=64"),
        *("train.batch_size=4", "train.eval_batch_size=4", "train.epochs=1", "train.eval_every_steps=2"),
        *("train.generation_samples=4", "train.logging_steps=1", "train.save_every_steps=3"),
    ],
    "vit-food101-brief": [
        *("data.format=imagefolder", "data.validation_size=8", "data.test_size=8", "train.batch_size=4"),
        *("train.epochs=2", "train.mixed_precision=no", "train.logging_steps=1"),
    ],
}
VIT_CLASSES = {"apple_pie": (200, 60, 40), "caesar_salad": (60, 180, 60), "sushi": (60, 80, 200)}
VIT_IMAGES_PER_CLASS = 12


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def drop_volatile(value: Any) -> Any:
    """``value`` with every timing key (:data:`VOLATILE_KEYS`) removed, at any depth."""
    if isinstance(value, dict):
        return {k: drop_volatile(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [drop_volatile(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# The Hub-free stand-ins for configs/vit-food101-brief.yaml
# --------------------------------------------------------------------------------------------------


def make_tiny_vit(folder: Path) -> Path:
    """Save a seeded random 2-layer ViT (hidden 32, 32x32 input, patch 8) and its image processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)
    return folder


def make_image_folder(folder: Path) -> Path:
    """Write a seeded image folder: noisy coloured 40x40 PNGs, one sub-folder per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, rgb in VIT_CLASSES.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(VIT_IMAGES_PER_CLASS):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 90, (40, 40, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(folder / name / f"{name}_{i:02d}.png")
    return folder


# --------------------------------------------------------------------------------------------------
# Running one config
# --------------------------------------------------------------------------------------------------


def overrides_for(name: str, work: Path, threads: int) -> list[str]:
    """The --set items of one reduced run: its size, its output folder and the pinned threads / device."""
    items = list(REDUCED[name])
    if name == "vit-food101-brief":
        items += [
            f"model.name_or_path={make_tiny_vit(work / 'tiny-vit')}",
            f"data.train={make_image_folder(work / 'food-images')}",
        ]
    return [*items, f"output.dir={work / 'runs' / name}", f"train.num_threads={threads}", "train.device=cpu"]


def run_config(lorakit: str, name: str, work: Path, threads: int) -> dict[str, Any]:
    """Train one reduced config with the lorakit CLI and read back its fingerprint.

    Raises:
        RuntimeError: ``lorakit train`` failed (its output's last lines are in the message).
    """
    sets = overrides_for(name, work, threads)
    cmd = [lorakit, "train", str(ROOT / "configs" / f"{name}.yaml"), "--overwrite", "--no-progress"]
    for item in sets:
        cmd += ["--set", item]
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONHASHSEED": "0",
    }
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise RuntimeError(f"{name}: lorakit train exited {proc.returncode}\n{tail}")
    run = work / "runs" / name
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    history = [
        json.loads(line)
        for line in (run / "history.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    meta = json.loads((run / "adapter" / "lorakit.json").read_text(encoding="utf-8"))
    return {
        "adapter_sha256": sha256_file(run / "adapter" / "adapter_model.safetensors"),
        "trainable_params": metrics.get("parameters", {}).get("trainable"),
        "base_model_fingerprint": meta.get("base_model", {}).get("fingerprint"),
        "metrics": drop_volatile(metrics),
        "history": drop_volatile(history),
        "overrides": [
            s for s in sets if not s.startswith(("output.dir=", "model.name_or_path=", "data.train="))
        ],
        "meta": {"seconds": round(seconds, 1)},
    }


# --------------------------------------------------------------------------------------------------
# Comparing two fingerprints
# --------------------------------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of nested dicts / lists keyed by their path, e.g. ``metrics.test.accuracy``."""
    if isinstance(value, dict):
        return {
            k: v
            for key, item in value.items()
            for k, v in flatten(item, f"{prefix}.{key}" if prefix else str(key)).items()
        }
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def compare_config(old: dict[str, Any], new: dict[str, Any]) -> tuple[bool, float, list[str]]:
    """Compare two configs' fingerprints.

    Returns:
        (adapter bytes identical, largest absolute difference of any number, the paths that differ).
    """
    a = flatten(
        {"metrics": old["metrics"], "history": old["history"], "trainable_params": old["trainable_params"]}
    )
    b = flatten(
        {"metrics": new["metrics"], "history": new["history"], "trainable_params": new["trainable_params"]}
    )
    worst, differ = 0.0, []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key, "<missing>"), b.get(key, "<missing>")
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (x, y))
        if numbers and not (math.isnan(x) and math.isnan(y)):
            gap = abs(x - y)
            worst = max(worst, gap if not math.isnan(gap) else math.inf)
        if x != y and not (numbers and math.isnan(x) and math.isnan(y)):
            differ.append(key)
    return old["adapter_sha256"] == new["adapter_sha256"], worst, differ


def compare(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Print a per-config comparison table; return whether everything is identical."""
    same_all = True
    print(f"{'config':<28} {'adapter bytes':<14} {'max |diff|':>11}  differing values")
    for name in sorted(new["configs"]):  # the configs run now (--configs may pick a few)
        if name not in old["configs"]:
            print(f"{name:<28} not in the old fingerprint")
            same_all = False
            continue
        same_bytes, worst, differ = compare_config(old["configs"][name], new["configs"][name])
        same_all &= same_bytes and not differ
        shown = ", ".join(differ[:4]) + (f" (+{len(differ) - 4} more)" if len(differ) > 4 else "")
        print(f"{name:<28} {'identical' if same_bytes else 'DIFFERENT':<14} {worst:>11.3g}  {shown or '-'}")
    return same_all


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def summary_row(name: str, fp: dict[str, Any]) -> str:
    m = fp["metrics"]
    test = {k: v for k, v in (m.get("test") or {}).items() if isinstance(v, float)}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in list(test.items())[:3])
    return (
        f"{name:<28} {fp['meta']['seconds']:>6.1f} s  {fp['adapter_sha256'][:16]}  "
        f"trainable {fp['trainable_params']:>9,}  steps {m.get('steps')}  test: {shown}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="Write the fingerprint JSON here.")
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="OLD.json",
        help="Compare with an earlier fingerprint; exit 1 on any difference.",
    )
    parser.add_argument(
        "--against",
        type=Path,
        metavar="NEW.json",
        help="With --compare: compare this saved fingerprint instead of running.",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=sorted(REDUCED),
        default=sorted(REDUCED),
        help="Configs to run (default: all).",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="train.num_threads pinned for every run (default 2)."
    )
    parser.add_argument(
        "--workdir", type=Path, help="Keep the runs here (default: a temporary folder, removed afterwards)."
    )
    parser.add_argument(
        "--lorakit",
        default=None,
        help="The lorakit command (default: the one beside this Python, else on PATH).",
    )
    args = parser.parse_args()

    if args.against:
        if not args.compare:
            parser.error("--against needs --compare OLD.json")
        return report(
            json.loads(args.compare.read_text(encoding="utf-8")),
            json.loads(args.against.read_text(encoding="utf-8")),
            args.compare,
        )
    beside = Path(sys.executable).parent / "lorakit"
    lorakit = args.lorakit or (str(beside) if beside.exists() else shutil.which("lorakit"))
    if not lorakit:
        print("error: no lorakit command found; pass --lorakit", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lorakit-fingerprint-"))
    work.mkdir(parents=True, exist_ok=True)
    version = subprocess.run([lorakit, "--version"], capture_output=True, text=True).stdout.strip()
    meta = {
        "lorakit": version,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
    }
    result: dict[str, Any] = {"meta": meta, "configs": {}}
    try:
        for name in args.configs:
            try:
                result["configs"][name] = run_config(lorakit, name, work, args.threads)
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(summary_row(name, result["configs"][name]), flush=True)
            if args.out:  # after each config: an interrupted run still leaves the finished ones
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.compare:
        return report(json.loads(args.compare.read_text(encoding="utf-8")), result, args.compare)
    return 0


def report(old: dict[str, Any], new: dict[str, Any], old_path: Path) -> int:
    """Print the comparison; return the exit code (0 identical, 1 different)."""
    if compare(old, new):
        print("identical to", old_path)
        return 0
    print("DIFFERENT from", old_path)
    return 1


if __name__ == "__main__":
    sys.exit(main())
