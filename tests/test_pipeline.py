"""Train -> artifacts -> evaluate -> predict on a tiny random BERT, through the API and the CLI."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import make_config, make_texts, run_cli, write_csv
from lorakit.errors import AdapterError, RunDirError


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path):
    """One training run shared by the read-only tests of this module (tensorboard on, as by default).

    bf16 autocast, as `mixed_precision: auto` trains on GPUs and on CPUs with native bf16 (emulated,
    slower but the same numbers, on the others), so that path is tested on every machine.
    """
    folder = tmp_path_factory.mktemp("trained")
    csv_path = write_csv(folder / "reviews.csv", make_texts(160))
    return lorakit.train(
        make_config(
            folder, tiny_bert_dir, csv_path, train={"mixed_precision": "bf16"}, output={"tensorboard": True}
        ),
        progress=False,
    )


@pytest.fixture()
def trained(trained_once, tmp_path: Path):
    """A private copy of the shared run, for tests that change or break it."""
    run = tmp_path / "copied-run"
    shutil.copytree(trained_once.run_dir, run)
    return dataclasses.replace(trained_once, run_dir=run, adapter_dir=run / "adapter")


def test_train_writes_a_complete_run(trained_once) -> None:
    run = trained_once.run_dir
    for f in (
        "config.yaml",
        "metrics.json",
        "history.jsonl",
        "train.log",
        "report/index.html",
        "report/curves.png",
        "report/confusion_0.png",
    ):
        assert (run / f).is_file(), f
    adapter = trained_once.adapter_dir
    for f in ("adapter_config.json", "adapter_model.safetensors", "lorakit.json", "README.md"):
        assert (adapter / f).is_file(), f
    meta = json.loads((adapter / "lorakit.json").read_text())
    assert meta["task"] == "text-classification"
    assert meta["label_space"] == {"id2label": {"0": "neg", "1": "pos"}}
    assert meta["base_model"]["fingerprint"].startswith("sha256:")
    assert set(meta["metrics"]) == {"validation", "test"}
    assert meta["versions"]["peft"] and meta["config"]["lora"]["r"] == 4
    assert json.loads((run / "metrics.json").read_text())["precision"] == "bf16 autocast"
    assert re.search(
        r"precision: bf16 autocast \([1-9]\d* frozen Linear layers stored in bf16\)",
        (run / "train.log").read_text(),
    )
    card = (adapter / "README.md").read_text()
    assert "base_model:" in card and "| 0 | neg |" in card and "PeftModel.from_pretrained" in card
    evals = [r for r in trained_once.history if r["split"] == "validation"]
    assert [r["epoch"] for r in evals] == [1, 2, 3, 4]  # one evaluation per epoch
    # The sentiment words decide the label: even a tiny random model must learn something.
    assert min(r["loss"] for r in evals[1:]) < evals[0]["loss"] - 0.01, evals
    best = max(r["accuracy"] for r in evals)
    assert trained_once.best_value == best and meta["metrics"]["validation"]["accuracy"] == best
    assert not list(run.glob(".*tmp*")), "temporary folders left behind"


def test_the_most_confident_mistakes_are_listed_in_metrics_and_report(trained_once) -> None:
    import numpy as np

    from lorakit.adapters.build import load_adapter
    from lorakit.data.batching import evaluate_model

    test = json.loads((trained_once.run_dir / "metrics.json").read_text())["test"]
    mistakes = test["mistakes"]
    wrong = round((1 - test["accuracy"]) * sum(c["support"] for c in test["per_class"].values()))
    assert len(mistakes) == min(wrong, 12)
    assert [m["probability"] for m in mistakes] == sorted((m["probability"] for m in mistakes), reverse=True)
    # each one is a real mistake of the saved adapter, shown as the text it read
    loaded = load_adapter(trained_once.adapter_dir, device="cpu")
    cfg = lorakit.load_config(trained_once.run_dir / "config.yaml")
    split = loaded.task.prepare(cfg, loaded.processor).splits["test"]
    collate = loaded.task.collate(loaded.processor, cfg.data)
    logits, labels, _ = evaluate_model(loaded.model, split, collate, batch_size=8, device=loaded.device)
    for m in mistakes:
        row = m["row"]
        assert (
            m["true"] == ["neg", "pos"][labels[row]] != m["predicted"] == ["neg", "pos"][logits[row].argmax()]
        )
        assert m["probability"] >= 0.5 and np.isclose(
            m["probability"], np.exp(logits[row]).max() / np.exp(logits[row]).sum(), atol=0.02
        )
        assert m["input"] == split[row]["input_text"]  # the text as written, not the decoded tokens
    page = (trained_once.run_dir / "report" / "index.html").read_text()
    assert ("Most confident mistakes: test" in page) == bool(mistakes)


def test_same_seed_gives_the_same_adapter(write_config, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    a = lorakit.train(write_config(train={"epochs": 1}, lora={"dropout": 0.1}), progress=False)
    first = load_file(a.adapter_dir / "adapter_model.safetensors")
    b = lorakit.train(
        write_config(train={"epochs": 1}, lora={"dropout": 0.1}), progress=False, overwrite=True
    )
    second = load_file(b.adapter_dir / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert a.test == b.test


def test_plain_peft_loads_adapter_with_identical_logits(trained_once) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    meta = json.loads((trained_once.adapter_dir / "lorakit.json").read_text())
    base_path = meta["base_model"]["resolved"]
    tok = AutoTokenizer.from_pretrained(base_path)
    enc = tok(["great film", "awful dull plot"], padding=True, return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    plain = PeftModel.from_pretrained(base, str(trained_once.adapter_dir)).eval()
    ours = lorakit.Predictor.from_adapter(trained_once.run_dir, device="cpu").loaded.model
    with torch.no_grad():
        assert torch.equal(plain(**enc).logits, ours(**enc).logits)


def _rescore_test_split(result) -> tuple[float, float]:
    """(loss, accuracy) of the saved adapter, loaded afresh, on the run's test split."""
    from lorakit.adapters.build import load_adapter
    from lorakit.data.batching import evaluate_model
    from lorakit.models import modeling

    loaded = load_adapter(result.adapter_dir, device="cpu")
    cfg = lorakit.load_config(result.run_dir / "config.yaml")
    data = loaded.task.prepare(cfg, loaded.processor)
    amp = modeling.pick_precision(cfg.train.mixed_precision, loaded.device)  # as training scored it
    logits, labels, loss = evaluate_model(
        loaded.model,
        data.splits["test"],
        loaded.task.collate(loaded.processor, cfg.data),
        batch_size=8,
        device=loaded.device,
        amp=amp,
    )
    return loss, float((logits.argmax(-1) == labels).mean())


def test_save_load_roundtrip_reproduces_best_validation(trained_once) -> None:
    """Scoring the saved adapter on the run's test data gives the metrics training reported."""
    loss, accuracy = _rescore_test_split(trained_once)
    assert loss == pytest.approx(trained_once.test["loss"], abs=1e-5)
    assert accuracy == pytest.approx(trained_once.test["accuracy"])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_adapter_is_saved_as_plain_lora_for_the_original_base(
    write_config, init: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trained with a modified base, saved as a rank-2r LoRA
    that reproduces the run's test scores on the real base."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = lorakit.train(write_config(train={"epochs": 1}, lora={"init": init}), progress=False)
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["init_lora_weights"] is True
    loss, accuracy = _rescore_test_split(result)
    assert loss == pytest.approx(result.test["loss"], abs=1e-4)
    assert accuracy == pytest.approx(result.test["accuracy"])
    assert not list(scratch.iterdir()), "the initial adapter was left behind"


def test_evaluate_and_predict(trained, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "holdout.csv", make_texts(20, seed=99))
    m = lorakit.evaluate(trained.run_dir, str(data))
    assert m["examples"] == 20 and 0 <= m["accuracy"] <= 1
    out = Path(m["output_dir"])
    assert (out / "metrics.json").is_file() and (out / "report" / "index.html").is_file()
    preds = lorakit.predict(
        trained.adapter_dir, ["great wonderful film", "awful boring film"], top_k=2, device="cpu"
    )
    assert [p["input"] for p in preds] == ["great wonderful film", "awful boring film"]
    assert all(p["label"] in {"pos", "neg"} and p["label"] == p["top_k"][0]["label"] for p in preds)
    assert sum(a["score"] for a in preds[0]["top_k"]) == pytest.approx(1.0, abs=1e-5)


def test_existing_run_dir_is_refused_without_overwrite(trained, write_config) -> None:
    before = (trained.adapter_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(RunDirError, match="already holds a run; pass --overwrite"):
        lorakit.train(write_config(output={"dir": str(trained.run_dir)}), progress=False)
    assert (trained.adapter_dir / "adapter_model.safetensors").read_bytes() == before


def test_adapter_on_a_different_base_is_refused(trained_once, tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    from lorakit.adapters.build import load_adapter

    other = tmp_path / "other"
    meta_path = trained_once.adapter_dir / "lorakit.json"
    meta = json.loads(meta_path.read_text())
    src = Path(meta["base_model"]["resolved"])
    BertModel(BertConfig.from_pretrained(src)).save_pretrained(other)
    for f in src.glob("*token*"):
        (other / f.name).write_bytes(f.read_bytes())
    with pytest.raises(AdapterError, match="differs from the one this adapter was trained on"):
        load_adapter(trained_once.adapter_dir, base_model=str(other))


def test_incomplete_adapter_dir_is_refused(trained) -> None:
    (trained.adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="incomplete"):
        lorakit.predict(trained.run_dir, ["x"])


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_cli_check_train_eval_predict(write_config, tmp_path: Path, capsys) -> None:
    cfg = write_config()
    r = run_cli(capsys, "check", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "splits    train 96, validation 32, test 32" in r.stdout
    assert "trainable" in r.stdout and "targets" in r.stdout
    assert re.search(r"optimizer steps at lr 0\.01 on cpu in (bf16 autocast|fp32);", r.stdout), r.stdout
    r = run_cli(capsys, "train", str(cfg), "--no-progress", "--set", "train.epochs=1")
    assert r.returncode == 0, r.stderr
    assert "held-out test (32 examples never trained on)" in r.stdout and "adapter:" in r.stdout
    run = tmp_path / "run"
    data = write_csv(tmp_path / "h.csv", make_texts(12, seed=5))
    r = run_cli(capsys, "eval", str(run), "--data", str(data))
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and "on 12 examples" in r.stdout
    r = run_cli(capsys, "predict", str(run / "adapter"), "great superb", "--json", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[0])
    assert row["input"] == "great superb" and len(row["top_k"]) == 2


def test_cli_reports_three_config_mistakes_in_one_line(write_config, capsys) -> None:
    cfg = write_config(lora={"r": 0}, train={"learning_rat": 0.1, "epochs": -1})
    r = run_cli(capsys, "train", str(cfg))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 3 problems in"), r.stderr
    assert "Traceback" not in r.stderr
    assert "did you mean 'learning_rate'" in lines[0]


@pytest.mark.slow  # two `lorakit` processes
def test_cli_user_errors_exit_2_without_traceback(write_config, tmp_path: Path) -> None:
    # Two real processes (one that loads the model, one that fails before); the whole catalogue of
    # mistakes runs in-process in test_bad_inputs.py.
    cases = [
        ("check", str(write_config(lora={"target_modules": ["qkv"]}))),
        ("predict", str(tmp_path / "no-such-run"), "x"),
    ]
    for args in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.startswith("error: "), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
