"""End-to-end on the real packaged SmolLM2-135M-Instruct (GGUF) and Rotten Tomatoes reviews
(slow: run by `make test` and CI)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_smollm2_gguf_learns_the_answer_format_on_a_few_real_reviews(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, smollm2_cache: Path
) -> None:
    """The packaged SmolLM2-135M-Instruct (GGUF) on 48 Rotten Tomatoes reviews (24 held out): answers
    become one word that stops at the end-of-turn token; the base model without the adapter does not."""
    config = ROOT / "configs" / "rt-smollm2-chat.yaml"
    small = [
        "--set",
        "data.max_train_samples=48",
        "--set",
        "data.test_size=24",
        "--set",
        "data.validation_size=8",
        "--set",
        "train.generation_samples=24",
        "--set",
        f"output.dir={tmp_path / 'run'}",
    ]
    cache = smollm2_cache  # where conftest converted the GGUF file once, as lorakit does on first use
    monkeypatch.setenv("LORAKIT_CACHE", str(cache))
    _cli = functools.partial(run_cli, capsys)  # the commands in this process (conftest.run_cli)
    r = _cli("train", str(config), *small, "--no-progress")
    assert r.returncode == 0, r.stderr
    # The GGUF file is converted once to a transformers folder, which later commands load instead.
    (converted,) = (cache / "gguf").iterdir()
    assert (converted / "config.json").is_file() and (converted / "model.safetensors").is_file()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["exact_match"] >= 0.5, metrics["test"]["samples"]
    assert metrics["test_base_model"]["exact_match"] < metrics["test"]["exact_match"]
    # GGUF base + adapter -> one merged Hugging Face folder that plain transformers loads and answers with:
    # one word, then the end-of-turn token (not 16 tokens of
    # chatter). (`lorakit generate` itself: tiny-model tests.)
    r = _cli("export", str(tmp_path / "run"), "--merge", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    template = json.loads((tmp_path / "run" / "adapter" / "lorakit.json").read_text())["config"]["data"][
        "instruction_template"
    ]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": template.format(text="A dull, lifeless and overlong film.")}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=end)[
        0, ids.shape[1] :
    ].tolist()
    assert end in out, tok.decode(out)  # stopped at <|im_end|>
    assert tok.decode(out, skip_special_tokens=True).strip() in ("negative", "positive"), tok.decode(out)
    # The converted tokenizer is the GGUF file's own: same ids for a chat prompt, same template.
    gguf = Path(
        json.loads((tmp_path / "run" / "adapter" / "lorakit.json").read_text())["base_model"]["resolved"]
    )
    direct = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cached = AutoTokenizer.from_pretrained(converted)
    assert cached.chat_template == direct.chat_template and cached.eos_token == direct.eos_token
    assert (
        cached(prompt + "negative<|im_end|>")["input_ids"]
        == direct(prompt + "negative<|im_end|>")["input_ids"]
    )
