"""Resume after a crash: SIGKILL at several points, resume each time, same result as no crash."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import train_until_stopped
from lorakit.errors import RunDirError

# Dropout on, several epochs, a checkpoint every 3 steps: the RNG and data position must be restored.
SETTINGS = {
    "lora": {"dropout": 0.1},
    "train": {"epochs": 3, "save_every_steps": 3, "num_threads": 2},
    "output": {"report": False},
}


def _newest_step(run: Path) -> int:
    steps = (
        [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")]
        if (run / "checkpoints").is_dir()
        else []
    )
    return max(steps, default=-1)


def _train_until_killed(config: Path, run: Path, *, after_step: int | None, delay: float | None) -> int:
    """Start `lorakit train --resume-or-start`; SIGKILL it once a checkpoint past `after_step` exists
    (or after `delay` s).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "train", str(config), "--resume-or-start", "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    started = time.monotonic()
    while proc.poll() is None:
        if (after_step is not None and _newest_step(run) >= after_step) or (
            delay is not None and time.monotonic() - started > delay
        ):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=120)
    return proc.returncode


@pytest.mark.slow  # four `lorakit train` processes
def test_sigkill_and_resume_gives_the_uninterrupted_result(write_config, tmp_path: Path) -> None:
    reference = lorakit.train(
        write_config(**SETTINGS), overrides=[f"output.dir={tmp_path / 'reference'}"], progress=False
    )
    expected = load_file(reference.adapter_dir / "adapter_model.safetensors")

    config = write_config(**SETTINGS)
    run = tmp_path / "run"
    rng = random.Random(1234)
    kill_steps = sorted(rng.sample(range(2, 34), 2))  # 36 optimizer steps in all
    # First a kill at a random moment (it may land before the first checkpoint: then resume starts
    # afresh), then kills right after randomly chosen checkpoints.
    codes = [_train_until_killed(config, run, after_step=None, delay=rng.uniform(4, 9))]
    codes += [_train_until_killed(config, run, after_step=s, delay=None) for s in kill_steps]
    assert -signal.SIGKILL in codes, codes  # at least one run really died mid-way
    assert not (run / "adapter").exists()  # an interrupted run leaves no finished-looking adapter

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
        for key in ("loss", "accuracy", "f1_macro"):
            assert metrics[split][key] == pytest.approx(ref[key], abs=1e-6), (split, key)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [r["step"] for r in reference.history]
    assert not (run / "checkpoints").exists()  # cleaned up once the run completed
    assert "resumed from checkpoint" in (run / "train.log").read_text()


def test_resume_refuses_a_changed_config_and_a_finished_run(
    write_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(**SETTINGS)
    run = tmp_path / "run"
    train_until_stopped(config, monkeypatch, at_step=7)
    assert _newest_step(run) >= 4 and not (run / "adapter").exists()
    with pytest.raises(RunDirError, match=r"config differs .*\(train.learning_rate\)"):
        lorakit.train(config, overrides=["train.learning_rate=0.5"], resume=True, progress=False)
    lorakit.train(config, resume=True, progress=False)
    with pytest.raises(RunDirError, match="already finished; nothing to resume"):
        lorakit.train(config, resume=True, progress=False)


def test_resume_without_checkpoint_is_refused_and_resume_or_start_starts_fresh(
    write_config, tmp_path: Path
) -> None:
    config = write_config(train={"epochs": 1})
    with pytest.raises(RunDirError, match="no run to resume in"):
        lorakit.train(config, resume=True, progress=False)
    assert not (tmp_path / "run").exists()  # nothing written
    result = lorakit.train(config, resume="auto", progress=False)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(
    write_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorakit.tasks.text_classification import TextClassification
    from lorakit.training import TrainingError

    original = TextClassification.load_model
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        model, new = original(self, *args, **kwargs)

        def nan_after_some_steps(module, inputs, output):
            calls["n"] += 1 if module.training else 0
            return output * float("nan") if calls["n"] > 7 else output

        model.classifier.register_forward_hook(nan_after_some_steps)
        return model, new

    monkeypatch.setattr(TextClassification, "load_model", poisoned)
    config = write_config(train={"epochs": 2, "save_every_steps": 3})
    with pytest.raises(
        TrainingError,
        match=r"training loss became nan at step 7: lower train.learning_rate.*last good "
        r"checkpoint is kept in checkpoints/",
    ):
        lorakit.train(config, progress=False)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-00000006" / "state.pt").is_file()
    assert (
        not (run / "metrics.json").exists() and not (run / "adapter").exists()
    )  # nothing that looks finished
