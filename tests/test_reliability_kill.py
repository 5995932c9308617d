"""Kill -9 and resume for the tasks the resume tests did not cover (issue 39, case 8): a causal LM whose
evaluations generate answers (exact match), and image classification with augmentation (random crops and
flips drawn from the RNG). Killed right after chosen checkpoints, resumed each time: the adapter tensors
and the metrics are the uninterrupted run's, checked from outside the processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import make_chat_rows, make_image_config, make_images, make_lm_config


def _newest_step(run: Path) -> int:
    folder = run / "checkpoints"
    return (
        max((int(p.name.split("-")[1]) for p in folder.glob("step-*")), default=-1) if folder.is_dir() else -1
    )


def _chat(folder: Path, models: dict[str, Path]) -> Path:
    data = folder / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_chat_rows(40)))
    settings = {
        "lora": {"dropout": 0.1},
        "train": {
            "epochs": 2,
            "batch_size": 4,
            "save_every_steps": 2,
            "eval_every_steps": 3,
            "num_threads": 2,
        },
        "output": {"report": False},
    }
    settings["train"].update(generation_samples=4, max_new_tokens=3)
    return make_lm_config(folder, models["llama"], data, **settings)


def _images(folder: Path, models: dict[str, Path]) -> Path:
    data = make_images(folder / "images", per_class=16)
    return make_image_config(
        folder,
        models["vit"],
        data,
        data={"augment": {"crop_scale": [0.5, 1.0], "hflip": True}, "validation_size": 6, "test_size": 6},
        lora={"dropout": 0.1},
        train={"epochs": 3, "batch_size": 4, "save_every_steps": 2},
        output={"report": False},
    )


#: task -> (config writer, kill after these checkpoints, metrics compared)
CASES: dict[str, tuple[Callable[[Path, dict[str, Path]], Path], tuple[int, ...], tuple[str, ...]]] = {
    "causal-lm": (_chat, (2, 7), ("loss", "exact_match")),
    "image-classification": (_images, (2, 7), ("loss", "accuracy")),
}


@pytest.mark.slow  # three `lorakit train` processes per task
@pytest.mark.parametrize("task", sorted(CASES))
def test_sigkill_and_resume_gives_the_uninterrupted_result(
    task, tmp_path, tiny_llama_dir, tiny_vit_dir
) -> None:
    write, kill_after, keys = CASES[task]
    models = {"llama": tiny_llama_dir, "vit": tiny_vit_dir}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reference = lorakit.train(write(tmp_path / "a", models), progress=False)
    expected = load_file(reference.adapter_dir / "adapter_model.safetensors")

    config, run = write(tmp_path / "b", models), tmp_path / "b" / "run"
    codes = []
    for after in kill_after:  # the first start has nothing to resume yet
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorakit", "train", str(config), "--resume-or-start", "--no-progress"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while proc.poll() is None:
            if _newest_step(run) >= after:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        codes.append(proc.wait(timeout=120))
    assert -signal.SIGKILL in codes and not (run / "adapter").exists(), codes
    final = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", str(config), "--resume", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert final.returncode == 0, final.stderr
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-6, rtol=0), k
    metrics = json.loads((run / "metrics.json").read_text())
    for split, ref in (("validation", reference.validation), ("test", reference.test)):
        for key in keys:
            assert metrics[split][key] == pytest.approx(ref[key], abs=1e-6), (split, key)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [r["step"] for r in reference.history]
    assert "resumed from checkpoint" in (run / "train.log").read_text()
