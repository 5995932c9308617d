"""Preference tuning (DPO / IPO / SimPO) on a tiny random Llama: pairs and their masks, the losses
against a hand computation, learning a toy preference, starting from an instruction-tuned adapter,
exact resume after SIGKILL, generate and export --merge."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

import lorakit
from conftest import COLOURS_OF, make_chat_rows, make_lm_config, write_run_config
from lorakit.cli import main
from lorakit.config.schema import LoraSettings, RunConfig
from lorakit.errors import ConfigError, DataError
from lorakit.tasks.causal_lm import IGNORE
from lorakit.tasks.preference import Preference, PreferenceDataConfig, PreferenceTrainConfig, as_reference

WRONG = {"sky": "red", "grass": "white", "snow": "green", "blood": "blue"}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_pairs(n: int) -> list[dict[str, Any]]:
    """'what colour is the X ?': the true colour chosen, a wrong one rejected."""
    things = list(COLOURS_OF)
    return [
        {
            "prompt": f"what colour is the {things[i % 4]} ?",
            "chosen": COLOURS_OF[things[i % 4]],
            "rejected": WRONG[things[i % 4]],
        }
        for i in range(n)
    ]


def pref_config(folder: Path, model_dir: Path, data_path: Path, **sections: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "task": "preference",
        "data": {"train": str(data_path), "validation_size": 8, "test_size": 8, "max_length": 64},
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {
            "epochs": 3,
            "batch_size": 8,
            "learning_rate": 2e-2,
            "logging_steps": 1,
            "seed": 7,
            "beta": 0.5,
            "generation_samples": 4,
            "max_new_tokens": 4,
        },
        "output": {"dir": str(folder / "run"), "tensorboard": False},
    }
    return write_run_config(folder, cfg, sections)


@pytest.fixture(scope="module")
def tok(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    folder = tmp_path_factory.mktemp("dpo-run")
    data = _jsonl(folder / "pairs.jsonl", make_pairs(64))
    return lorakit.train(pref_config(folder, tiny_llama_dir, data), progress=False)


def _labelled(tok, ids: list[int], labels: list[int]) -> list[str]:
    return [t for t, lab in zip(tok.convert_ids_to_tokens(ids), labels, strict=True) if lab != IGNORE]


# ---- data ---------------------------------------------------------------------------------------


def test_pairs_label_the_final_answers_only_and_bad_rows_are_counted(tok) -> None:
    d = PreferenceDataConfig(train="x", system_prompt="you are helpful")
    rows = [
        {"prompt": "what colour is the sky ?", "chosen": "blue", "rejected": "red"},
        # a multi-turn chat prompt: the earlier assistant turn is context, not a target
        {
            "prompt": [
                {"role": "user", "content": "say a word"},
                {"role": "assistant", "content": "film"},
                {"role": "user", "content": "and the grass ?"},
            ],
            "chosen": [{"role": "assistant", "content": "green please"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
        {"prompt": "what colour is the snow ?", "chosen": "white", "rejected": " white "},  # identical
        {"prompt": "what colour is the blood ?", "chosen": "red", "rejected": None},  # empty side
    ]
    out, counts = Preference()._encode_split(
        Dataset.from_list([rows[0], rows[2], rows[3]]), tok, d, key="data.train"
    )
    assert counts == {
        "skipped_identical": 1,
        "skipped_empty": 1,
        "prompt_cut": 0,
        "answer_cut": 0,
        "dropped": 0,
    }
    assert len(out) == 1
    assert _labelled(tok, out[0]["chosen_input_ids"], out[0]["chosen_labels"]) == ["blue", "<|im_end|>"]
    assert _labelled(tok, out[0]["rejected_input_ids"], out[0]["rejected_labels"]) == ["red", "<|im_end|>"]
    # both sides share the rendered prompt (system prompt, user turn, generation prompt)
    p = out[0]["prompt_ids"]
    assert out[0]["chosen_input_ids"][: len(p)] == p == out[0]["rejected_input_ids"][: len(p)]
    assert tok.convert_ids_to_tokens(p)[:3] == ["<|im_start|>", "system", "you"]

    chat, _ = Preference()._encode_split(Dataset.from_list([rows[1]]), tok, d, key="data.train")
    assert _labelled(tok, chat[0]["chosen_input_ids"], chat[0]["chosen_labels"]) == [
        "green",
        "please",
        "<|im_end|>",
    ]
    assert "film" in tok.convert_ids_to_tokens(chat[0]["chosen_input_ids"])  # kept as context

    # whole conversations and no prompt column: the prompt is what precedes the answers
    whole = [
        {
            "chosen": [
                {"role": "user", "content": "what colour is the sky ?"},
                {"role": "assistant", "content": "blue"},
            ],
            "rejected": [
                {"role": "user", "content": "what colour is the sky ?"},
                {"role": "assistant", "content": "red"},
            ],
        }
    ]
    conv, _ = Preference()._encode_split(Dataset.from_list(whole), tok, d, key="data.train")
    assert (
        conv[0]["chosen_input_ids"] == out[0]["chosen_input_ids"]
        and conv[0]["rejected_labels"] == out[0]["rejected_labels"]
    )


def test_bad_pair_data_is_one_clear_error(tok) -> None:
    d = PreferenceDataConfig(train="x")
    with pytest.raises(DataError, match="no column 'prompt'"):
        Preference()._encode_split(
            Dataset.from_list([{"chosen": "blue", "rejected": "red"}]), tok, d, key="data.train"
        )
    with pytest.raises(DataError, match="no usable pair among 2 rows \\(skipped_identical: 2\\)"):
        Preference()._encode_split(
            Dataset.from_list([{"prompt": "a", "chosen": "blue", "rejected": "blue"}] * 2),
            tok,
            d,
            key="data.train",
        )
    other = [
        {
            "chosen": [{"role": "user", "content": "sky"}, {"role": "assistant", "content": "blue"}],
            "rejected": [{"role": "user", "content": "grass"}, {"role": "assistant", "content": "red"}],
        }
    ]
    with pytest.raises(DataError, match="continue different prompts"):
        Preference()._encode_split(Dataset.from_list(other), tok, d, key="data.train")


def test_truncation_cuts_the_prompt_first_and_counts_cut_answers(tok) -> None:
    d = PreferenceDataConfig(train="x", max_length=16)
    rows = [
        {"prompt": "what " * 40 + "?", "chosen": "blue", "rejected": "red"},
        {"prompt": "say a word", "chosen": "red " * 40, "rejected": "blue"},
    ]
    out, counts = Preference()._encode_split(Dataset.from_list(rows), tok, d, key="data.train")
    assert counts["prompt_cut"] == 1 and counts["answer_cut"] == 1 and len(out) == 2
    assert _labelled(tok, out[0]["chosen_input_ids"], out[0]["chosen_labels"]) == ["blue", "<|im_end|>"]
    assert max(len(out[1]["chosen_input_ids"]), len(out[1]["rejected_input_ids"])) <= 16


def test_collate_puts_chosen_then_rejected_in_one_batch(tok) -> None:
    d = PreferenceDataConfig(train="x", pad_to_multiple_of=None)
    out, _ = Preference()._encode_split(Dataset.from_list(make_pairs(3)), tok, d, key="data.train")
    batch = Preference().collate(tok, d)([out[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 6 and set(batch) == {"input_ids", "labels", "attention_mask"}
    for i in range(3):
        n = len(out[i]["rejected_input_ids"])
        assert batch["input_ids"][3 + i, :n].tolist() == out[i]["rejected_input_ids"]
    assert Preference().loss_units(batch) == 3


def test_config_sections_are_the_tasks_own(tmp_path: Path, tiny_llama_dir: Path) -> None:
    data = _jsonl(tmp_path / "pairs.jsonl", make_pairs(8))
    from lorakit.config.loading import load_config

    cfg = load_config(
        pref_config(tmp_path, tiny_llama_dir, data, data={"chosen_column": "good"}, train={"loss": "ipo"})
    )
    assert (
        isinstance(cfg.data, PreferenceDataConfig)
        and cfg.data.chosen_column == "good"
        and cfg.train.loss == "ipo"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(
            pref_config(
                tmp_path,
                tiny_llama_dir,
                data,
                data={"chosen_colum": "good"},
                train={"loss": "kto", "beta": 0},
            )
        )
    text = str(exc.value)
    assert "did you mean 'chosen_column'" in text and "train.loss" in text and "train.beta" in text
    with pytest.raises(ConfigError, match="data.chosen_column: unknown key"):  # not a key of other tasks
        load_config(make_lm_config(tmp_path, tiny_llama_dir, data, data={"chosen_column": "good"}))


# ---- losses -------------------------------------------------------------------------------------


def _hand_logp(model: torch.nn.Module, ids: list[int], labels: list[int]) -> float:
    """Sum of log p(token | earlier tokens) over the labelled tokens, one position at a time."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    total = 0.0
    for t in range(1, len(ids)):
        if labels[t] != IGNORE:
            total += float(logits[t - 1].log_softmax(-1)[ids[t]])
    return total


def _moved_adapter(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The tiny Llama with a LoRA adapter whose B matrices are random (B starts at zero, and then the
    policy would equal the reference)."""
    from transformers import AutoModelForCausalLM

    from lorakit.models.modeling import apply_lora

    torch.manual_seed(0)
    model = apply_lora(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
        LoraSettings(r=4),
        task_type="CAUSAL_LM",
        new_modules=[],
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("kind", ["dpo", "ipo", "simpo"])
def test_loss_equals_a_hand_computation(kind: str, tiny_llama_dir: Path, tok) -> None:

    model = _moved_adapter(tiny_llama_dir).eval()
    task = Preference()
    task.train_cfg = PreferenceTrainConfig(loss=kind, beta=0.3, simpo_gamma=0.2)
    d = PreferenceDataConfig(train="x")
    pairs, _ = task._encode_split(
        Dataset.from_list(
            [*make_pairs(3), {"prompt": "say a word", "chosen": "good film please", "rejected": "bad"}]
        ),
        tok,
        d,
        key="k",
    )
    rows = [pairs[i] for i in range(len(pairs))]
    got = task.loss(model, task.collate(tok, d)(rows))

    def hand_loss(lw: float, ll: float, rw: float, rl: float, nw: int, nl: int) -> float:
        if kind == "dpo":
            return math.log1p(math.exp(-0.3 * ((lw - rw) - (ll - rl))))
        if kind == "ipo":
            return ((lw - rw) / nw - (ll - rl) / nl - 1 / (2 * 0.3)) ** 2
        return math.log1p(math.exp(-(0.3 * (lw / nw - ll / nl) - 0.2)))

    expected, unmoved = [], []
    with torch.no_grad():
        for r in rows:
            lw, ll = (
                _hand_logp(model, r[f"{s}_input_ids"], r[f"{s}_labels"]) for s in ("chosen", "rejected")
            )
            with model.disable_adapter():
                rw, rl = (
                    _hand_logp(model, r[f"{s}_input_ids"], r[f"{s}_labels"]) for s in ("chosen", "rejected")
                )
            nw, nl = (sum(x != IGNORE for x in r[f"{s}_labels"][1:]) for s in ("chosen", "rejected"))
            expected.append(hand_loss(lw, ll, rw, rl, nw, nl))
            unmoved.append(hand_loss(rw, rl, rw, rl, nw, nl))  # the policy left at the base model
    got = float(got.detach())
    assert got == pytest.approx(sum(expected) / len(expected), rel=1e-4, abs=1e-5)
    # the adapter really moved the policy (for DPO the unmoved loss is log 2, for IPO (1 / 2 beta)^2)
    assert abs(got - sum(unmoved) / len(unmoved)) > 1e-3, (got, unmoved)


def test_each_prompt_runs_once_with_the_two_row_logits_and_gradients(tiny_llama_dir: Path, tok) -> None:
    """Pairs share their prompt: it runs once and both answers continue from its cache. The answer
    log-probabilities and the LoRA gradients are the plain two-row pass's; a pair whose sides were
    truncated to different prompts takes the plain pass."""

    from lorakit.tasks.causal_lm import answer_logits
    from lorakit.tasks.preference import pair_logps, row_logps, shared_prompt_starts

    model = _moved_adapter(tiny_llama_dir, torch.float64)
    d = PreferenceDataConfig(train="x")
    rows = [*make_pairs(3), {"prompt": "say a word", "chosen": "good film please", "rejected": "bad"}]
    pairs, _ = Preference()._encode_split(Dataset.from_list(rows), tok, d, key="k")
    batch = Preference().collate(tok, d)([pairs[i] for i in range(len(pairs))])
    widths: list[int] = []
    hook = model.get_base_model().model.register_forward_pre_hook(
        lambda m, a, kw: widths.append(kw["input_ids"].shape[0]), with_kwargs=True
    )

    def logps_and_grads(fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logps, _ = fn()
        (logps * torch.linspace(-1, 1, len(logps), dtype=logps.dtype)).sum().backward()
        return logps.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    shared, g_shared = logps_and_grads(lambda: pair_logps(model, batch, shared_prompt_starts(model, batch)))
    assert widths == [4, 8]  # the 4 prompts once, then the 8 answers on their cache
    plain, g_plain = logps_and_grads(lambda: row_logps(*answer_logits(model, batch), 8))
    # A float64 model; the log-softmax runs in float32 (as in training), so the gradients agree to
    # float32 rounding of the largest entry. A wrong or missing path through the cache is O(1).
    torch.testing.assert_close(shared, plain, rtol=1e-7, atol=1e-7)
    for a, b in zip(g_shared, g_plain, strict=True):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
    hook.remove()

    cut = {k: v.clone() for k, v in batch.items()}
    cut["input_ids"][4, 1] = cut["input_ids"][0, 1] + 1  # the rejected side's prompt differs in one token
    assert shared_prompt_starts(model, cut) is None


def test_gradient_checkpointing_keeps_the_loss_and_gradients(tiny_llama_dir: Path, tok) -> None:
    """``train.gradient_checkpointing``: the DPO loss and the LoRA gradients are those without it. Both
    passes then take the plain two-row path (transformers keeps no cache under checkpointing, and the
    reference must carry the policy's rounding: in bf16 two paths would make them differ at step 0)."""
    from lorakit.models.modeling import enable_gradient_checkpointing

    model = _moved_adapter(tiny_llama_dir, torch.float64).train()
    d = PreferenceDataConfig(train="x")
    pairs, _ = Preference()._encode_split(Dataset.from_list(make_pairs(4)), tok, d, key="k")
    batch = Preference().collate(tok, d)([pairs[i] for i in range(len(pairs))])
    task = Preference()
    task.train_cfg = PreferenceTrainConfig(loss="dpo", beta=0.5)
    widths: list[int] = []
    model.get_base_model().model.register_forward_pre_hook(
        lambda m, a, kw: widths.append(kw["input_ids"].shape[0]), with_kwargs=True
    )

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = task.loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain, g_plain = loss_and_grads()
    assert widths == [4, 8, 4, 8]  # policy and reference: prompts once, then the answers
    widths.clear()
    enable_gradient_checkpointing(model, "tiny llama")
    layer = model.get_base_model().model.layers[0]
    replayable, calls = layer._gradient_checkpointing_func, []
    layer._gradient_checkpointing_func = lambda *a, **kw: (calls.append(1), replayable(*a, **kw))[1]
    checkpointed, g_checkpointed = loss_and_grads()
    assert widths == [8, 8]  # policy and reference: two rows per pair
    assert len(calls) == 1  # the policy pass ran through the checkpoint; the reference, without grad, not
    torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=1e-7)
    for a, b in zip(g_checkpointed, g_plain, strict=True):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())

    with torch.no_grad():  # a fresh adapter (B = 0): in bf16 the policy still equals the reference
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert float(task.loss(model, batch).detach()) == pytest.approx(math.log(2), abs=1e-6)


# ---- training and the other stages ---------------------------------------------------------------


def test_dpo_learns_the_toy_preference_and_reports_its_metrics(dpo_run) -> None:
    evals = [r for r in dpo_run.history if r["split"] == "validation"]
    # At the start policy == reference: every reward is 0 and the loss log 2.
    assert (
        evals[-1]["reward_accuracy"] == 1.0 and evals[-1]["reward_margin"] > 1.0 and evals[-1]["loss"] < 0.3
    )
    assert evals[-1]["reward_margin"] > evals[0]["reward_margin"] > 0
    assert evals[-1]["logps_chosen"] > evals[-1]["logps_rejected"]
    assert evals[-1]["kl_chosen_tokens"] > 0 and "kl_sampled" in evals[-1]
    test = dpo_run.test
    assert (
        test["reward_accuracy"] == 1.0
        and len(test["samples"]) == 4
        and {"prompt", "reference", "output"} <= set(test["samples"][0])
    )
    meta = json.loads((dpo_run.adapter_dir / "lorakit.json").read_text())
    assert meta["task"] == "preference" and meta["config"]["train"]["loss"] == "dpo"
    assert meta["data"]["stats"]["pairs"]["train"]["skipped_identical"] == 0
    html = (dpo_run.run_dir / "report" / "index.html").read_text()
    assert "reward_accuracy" in html and "Sample generations" in html


def test_generate_and_export_merge_work_for_preference_adapters(
    dpo_run, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from lorakit.serving.prediction import generate

    out = generate(
        dpo_run.run_dir, ["what colour is the snow ?", "what colour is the sky ?"], max_new_tokens=4
    )
    # DPO moves the chosen answer up relative to the rejected one, not to the top: only check that it answers.
    assert [o["input"] for o in out] == ["what colour is the snow ?", "what colour is the sky ?"] and all(
        isinstance(o["output"], str) for o in out
    )
    capsys.readouterr()
    merged = tmp_path / "merged"
    with pytest.raises(SystemExit) as exc:
        main(["export", str(dpo_run.run_dir), "--merge", str(merged)])
    assert exc.value.code in (0, None)
    assert "largest |unmerged - merged| logit difference" in capsys.readouterr().out
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()


def test_training_from_an_instruction_tuned_adapter_keeps_it_as_the_reference(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    (tmp_path / "sft").mkdir()
    sft = lorakit.train(
        make_lm_config(
            tmp_path / "sft",
            tiny_llama_dir,
            _jsonl(tmp_path / "chat.jsonl", make_chat_rows(32)),
            train={"max_steps": 4, "generation_samples": 0},
            output={"report": False},
        ),
        progress=False,
    )
    data = _jsonl(tmp_path / "pairs.jsonl", make_pairs(32))
    cfg = pref_config(
        tmp_path,
        tiny_llama_dir,
        data,
        train={"reference_adapter": str(sft.run_dir), "max_steps": 4, "generation_samples": 0},
        output={"report": False},
    )
    run = lorakit.train(cfg, progress=False)
    sft_w, got = (
        load_file(sft.adapter_dir / "adapter_model.safetensors"),
        load_file(run.adapter_dir / "adapter_model.safetensors"),
    )
    assert got.keys() == sft_w.keys() and any(
        not torch.equal(got[k], sft_w[k]) for k in got
    )  # started from it, then moved

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    task = Preference()
    from lorakit.config.loading import load_config

    rc: RunConfig = load_config(cfg)
    model = task.apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), rc, [], sft.adapter_dir)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    plain_sft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(sft.adapter_dir)
    ).eval()
    x = torch.tensor([[2, 5, 10, 11, 12, 3, 2]])
    with torch.no_grad(), as_reference(model) as ref:
        assert torch.allclose(ref(input_ids=x).logits, plain_sft(input_ids=x).logits, atol=1e-6)
    assert [
        n for n, p in model.named_parameters() if p.requires_grad
    ] == trainable  # switching back kept the trainable set


def _newest_step(run: Path) -> int:
    steps = (
        [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")]
        if (run / "checkpoints").is_dir()
        else []
    )
    return max(steps, default=-1)


@pytest.mark.slow  # three `lorakit train` processes
def test_sigkill_and_resume_gives_the_uninterrupted_result(tmp_path: Path, tiny_llama_dir: Path) -> None:
    data = _jsonl(tmp_path / "pairs.jsonl", make_pairs(48))
    settings = {
        "lora": {"dropout": 0.1},
        "train": {
            "epochs": 2,
            "batch_size": 4,
            "save_every_steps": 2,
            "generation_samples": 2,
            "num_threads": 2,
        },
        "output": {"report": False},
    }
    reference = lorakit.train(pref_config(tmp_path / "a", tiny_llama_dir, data, **settings), progress=False)
    expected = load_file(reference.adapter_dir / "adapter_model.safetensors")

    config = pref_config(tmp_path / "b", tiny_llama_dir, data, **settings)
    run = tmp_path / "b" / "run"
    codes = []
    for after in (3, 11):  # 16 optimizer steps in all
        proc = subprocess.Popen(  # the first start has nothing to resume yet
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
    assert -signal.SIGKILL in codes and not (run / "adapter").exists()
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
    for key in ("loss", "reward_accuracy", "reward_margin", "kl_sampled"):
        assert metrics["test"][key] == pytest.approx(reference.test[key], abs=1e-6), key
    assert "resumed from checkpoint" in (run / "train.log").read_text()


def test_publish_then_serve_chat_answers_as_generate(dpo_run, tmp_path: Path, capsys) -> None:
    """A preference adapter is published to a registry and served from it by name: the chat route's
    greedy answer is `generate`'s."""
    from fastapi.testclient import TestClient

    from lorakit.serving import Engine, create_app
    from lorakit.serving.prediction import generate

    registry = tmp_path / "registry"
    with pytest.raises(SystemExit) as exc:
        main(["publish", str(dpo_run.run_dir), "--name", "colours-dpo", "--registry", str(registry)])
    assert exc.value.code in (0, None) and "published colours-dpo:1" in capsys.readouterr().out
    e = Engine(["colours-dpo"], registry=registry, window_ms=20)
    try:
        assert e.task.name == "preference"
        question = [{"role": "user", "content": "what colour is the sky ?"}]
        r = TestClient(create_app(e)).post(
            "/v1/chat/completions",
            json={"model": "colours-dpo", "messages": question, "max_tokens": 4, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        expected = generate(dpo_run.run_dir, ["what colour is the sky ?"], max_new_tokens=4, device="cpu")
        assert r.json()["choices"][0]["message"]["content"] == expected[0]["output"]
    finally:
        e.close()


@pytest.mark.slow  # torchrun: three processes
def test_two_processes_match_one_with_the_same_global_batch(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """DDP: 2 processes at batch 4 end with the adapter and metrics of 1 process at batch 8 (the pairs of
    a batch split over the ranks, the loss and the metrics averaged over all pairs)."""
    from test_distributed import ENV, assert_same_adapter, torchrun

    data = _jsonl(tmp_path / "pairs.jsonl", make_pairs(48))

    def config(name: str, batch_size: int) -> Path:
        return pref_config(
            tmp_path / name,
            tiny_llama_dir,
            data,
            train={"batch_size": batch_size, "epochs": 2, "mixed_precision": "no", "generation_samples": 2},
            output={"report": False},
        )

    lorakit.train(config("one", 8), progress=False)  # 1 process: this one
    r2 = torchrun(config("two", 4), env=ENV)
    assert r2.returncode == 0, r2.stderr[-3000:]
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    assert_same_adapter(one / "adapter", two / "adapter")
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    for split in ("validation", "test"):
        for key in ("loss", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"):
            assert m2[split][key] == pytest.approx(m1[split][key], rel=1e-5, abs=1e-5), (split, key)
