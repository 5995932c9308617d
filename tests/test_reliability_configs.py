"""Every shipped config under configs/ through `lorakit check` and a one-step `lorakit train`, with its
data present (issue 39, case 6).

Each config keeps its task, data settings, LoRA settings and schedule options; what is substituted is
what a test cannot afford: the base model (the tiny random one of its task), the size (a few rows, one
optimizer step, two generated answers), and data that only a demo, the Hub or a Debian package provides
(the DPO pairs `make demo-dpo` writes, Food-101, Fashion-MNIST's idx files) is made here in the same
form. The packaged movie reviews are read for real.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import make_images
from lorakit.cli import main
from lorakit.config.schema import load_yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
MODEL_OF = {
    "text-classification": "bert",
    "token-classification": "bert",
    "image-classification": "vit",
    "causal-lm": "llama",
    "preference": "llama",
}


def _idx_pair(folder: Path, stem: str, n: int, seed: int) -> Path:
    """Fashion-MNIST's form: ``<stem>-images-idx3-ubyte.gz`` (28x28 bytes) and its labels file."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    path = folder / f"{stem}-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()))
    (folder / f"{stem}-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">II", 2049, n) + labels.tobytes())
    )
    return path


def _dpo_pairs(path: Path) -> Path:
    """What scripts/dpo_demo.py writes: prompt / chosen / rejected rows."""
    rows = [{"prompt": f"say a word {i}", "chosen": "good film", "rejected": "bad film"} for i in range(48)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _present_data(raw: dict[str, Any], tmp: Path) -> None:
    """Point the data at files that exist, made here where a demo, the Hub or apt provides them."""
    data = raw["data"]
    if data["train"].startswith("runs/dpo-demo/"):
        data["train"] = str(_dpo_pairs(tmp / "pairs.jsonl"))
    elif data.get("format") == "hub":  # Food-101 from the Hub: an image folder of the same columns
        data.update(train=str(make_images(tmp / "images", per_class=8)), format="imagefolder")
    elif "idx3-ubyte" in data["train"]:
        data["train"] = str(_idx_pair(tmp, "train", 60, 0))
        data["test"] = str(_idx_pair(tmp, "t10k", 20, 1))


def _shrunk(path: Path, tmp: Path, models: dict[str, Path]) -> Path:
    raw = load_yaml(path.read_text())
    task = raw.get("task", "text-classification")
    _present_data(raw, tmp)
    data, train = raw["data"], raw.setdefault("train", {})
    data.update(validation_size=8, max_eval_samples=8, max_train_samples=24)
    if data.get("test_size") or data.get("test"):
        data["test_size"] = 8 if not data.get("test") else 0
    if "max_length" in data:
        data["max_length"] = min(data["max_length"], 64)
    data.pop("image_size", None)  # the tiny ViT is built for 32x32
    raw["model"] = {"name_or_path": str(models[MODEL_OF[task]])}
    lora = raw.setdefault("lora", {})
    rank = lora.get("r", 8)
    if rank > 4:  # the tiny models' layers are 32 wide: the same alpha / r, a smaller r
        lora.update(r=4, alpha=lora.get("alpha", 8) * 4 / rank)
    train.update(max_steps=1, batch_size=4, eval_batch_size=4, gradient_accumulation_steps=1)
    train["mixed_precision"] = "no"  # fp16 of the Food-101 brief needs a CUDA GPU
    if task in ("causal-lm", "preference"):
        train.update(generation_samples=2, max_new_tokens=2)
    raw["output"] = {**raw.get("output", {}), "dir": str(tmp / "run"), "report_to": [], "report": False}
    out = tmp / path.name
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


@pytest.fixture()
def models(tiny_bert_dir: Path, tiny_vit_dir: Path, tiny_llama_dir: Path) -> dict[str, Path]:
    return {"bert": tiny_bert_dir, "vit": tiny_vit_dir, "llama": tiny_llama_dir}


def test_every_task_of_the_shipped_configs_has_a_tiny_model() -> None:
    tasks = {load_yaml(p.read_text()).get("task", "text-classification") for p in CONFIGS}
    assert tasks <= set(MODEL_OF) and len(CONFIGS) >= 6


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_checks_and_trains_one_step_with_its_data(path, tmp_path, models, capsys) -> None:
    config = _shrunk(path, tmp_path, models)
    for args in (["check", str(config)], ["train", str(config), "--no-progress"]):
        capsys.readouterr()
        try:
            main(args)
        except SystemExit as exc:
            assert not exc.code, (args[0], capsys.readouterr().err)
    out = capsys.readouterr().out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file(), out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["validation"]
