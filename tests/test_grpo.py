"""GRPO (online RL with rewards) on a tiny random Llama: group advantages and the loss against hand
computations, rewards and their one-line errors, learning a toy reward end to end, a classifier
adapter as the reward model, exact resume after SIGKILL, generate / export / serve of the adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import lorakit
from conftest import COLOURS_OF, write_run_config
from lorakit.config.loading import load_config
from lorakit.errors import ConfigError
from lorakit.tasks.grpo import RewardError, checked_rewards, group_advantages


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def colour_prompts(n: int, kinds: int = 4) -> list[dict[str, Any]]:
    things = list(COLOURS_OF)[:kinds]
    return [
        {"prompt": f"what colour is the {things[i % kinds]} ?", "colour": COLOURS_OF[things[i % kinds]]}
        for i in range(n)
    ]


def grpo_config(folder: Path, model_dir: Path, data_path: Path, **sections: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "task": "grpo",
        "data": {"train": str(data_path), "validation_size": 4, "test_size": 4, "max_length": 32},
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {
            "epochs": 1,
            "batch_size": 4,
            "learning_rate": 3e-2,
            "logging_steps": 1,
            "seed": 7,
            "num_generations": 4,
            "max_completion_length": 4,
            "generation_samples": 4,
            "rewards": [{"function": "exact_match", "column": "colour"}],
        },
        "output": {"dir": str(folder / "run"), "tensorboard": False},
    }
    return write_run_config(folder, cfg, sections)


#: A reward with partial credit (share of the answer's words that are the right colour): dense enough
#: for a tiny random model to climb in a few steps, unlike exact match.
REWARD_FILE = """
def colour_share(prompts, completions, colour, **kwargs):
    out = []
    for text, want in zip(completions, colour):
        words = text.split()
        out.append(sum(w == want for w in words) / max(1, len(words)))
    return out


def broken(prompts, completions, **kwargs):
    raise ZeroDivisionError("division by zero")


def too_few(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def not_a_number(prompts, completions, **kwargs):
    return [float("nan")] + [1.0] * (len(completions) - 1)
"""


@pytest.fixture()
def rewards_py(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE)
    return path


# ---- the maths -----------------------------------------------------------------------------------


def test_group_advantages_are_normalised_within_each_group() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 3.0, math.nan, 1.0, 2.0])
    adv, std = group_advantages(r, 4, "group")
    first = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (torch.tensor([1.0, 0, 0, 0]).std() + 1e-4)
    assert torch.allclose(adv[:4], first, atol=1e-5)
    assert torch.equal(adv[4:8], torch.zeros(4)) and float(std[4]) == 0.0  # a group with one reward
    # NaN (no reward applied) is left out of its group's mean and std, and gets advantage 0
    rest = torch.tensor([3.0, 1.0, 2.0])
    assert float(adv[9]) == 0.0
    assert float(adv[8]) == pytest.approx(float((3.0 - rest.mean()) / (rest.std() + 1e-4)), abs=1e-5)
    plain, _ = group_advantages(r, 4, "none")  # Dr. GRPO: centred only
    assert torch.allclose(plain[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def _policy(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    return model


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_equals_a_hand_computation(loss_type: str, tiny_llama_dir: Path) -> None:
    """The clipped ratio loss with the KL term, against the formulas written out on the log-probs."""
    from lorakit.tasks.grpo import GRPO, GRPOTrainConfig, completion_logps

    model = _policy(tiny_llama_dir)
    task = GRPO()
    task.train_cfg = GRPOTrainConfig(
        rewards=[{"function": "length", "max_tokens": 2}],
        beta=0.3,
        epsilon=0.1,
        loss_type=loss_type,
        max_completion_length=5,
        temperature=0.7,
    )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 30, (4, 9), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # a left-padded prompt
    completion = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    attn[:, -5:] = completion
    batch = {
        "input_ids": ids,
        "attention_mask": attn,
        "completion_mask": completion,
        "advantages": torch.tensor([1.5, -0.5, 0.3, -1.3], dtype=torch.float64),
    }
    with torch.no_grad():
        p = completion_logps(model, batch, 0.7)
    batch["old_logps"] = p + torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2  # some ratios clip
    batch["ref_logps"] = p + torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5
    loss, metrics = task.loss_with_metrics(model, batch)

    m = completion.double()
    ratio = torch.exp(p - batch["old_logps"])
    a = batch["advantages"][:, None]
    lt = -torch.minimum(ratio * a, ratio.clamp(0.9, 1.1) * a)
    d = batch["ref_logps"] - p
    lt = lt + 0.3 * (torch.exp(d) - d - 1)
    expected = {
        "grpo": ((lt * m).sum(1) / m.sum(1)).mean(),
        "dapo": (lt * m).sum() / m.sum(),
        "dr_grpo": (lt * m).sum() / (4 * 5),
    }[loss_type]
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-9)
    clipped = ((ratio < 0.9) & (a < 0)) | ((ratio > 1.1) & (a > 0))
    assert metrics["clip_ratio"] == pytest.approx(float((clipped * m).sum() / m.sum()))
    assert 0 < metrics["clip_ratio"] < 1
    loss.backward()  # gradients reach the adapter
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n
    )


def test_first_pass_gradient_is_the_policy_gradient(tiny_llama_dir: Path) -> None:
    """At the first update (ratio 1, no KL) the GRPO loss's gradient is -mean_i A_i grad log pi(y_i)."""
    from lorakit.tasks.grpo import GRPO, GRPOTrainConfig, completion_logps

    model = _policy(tiny_llama_dir)
    task = GRPO()
    task.train_cfg = GRPOTrainConfig(rewards=[{"function": "length", "max_tokens": 2}], loss_type="grpo")
    ids = torch.randint(4, 30, (2, 7), generator=torch.Generator().manual_seed(3))
    completion = torch.tensor([[1, 1, 1], [1, 1, 0]])
    attn = torch.cat([torch.ones(2, 4, dtype=torch.long), completion], 1)
    batch = {
        "input_ids": ids,
        "attention_mask": attn,
        "completion_mask": completion,
        "advantages": torch.tensor([0.8, -0.8], dtype=torch.float64),
    }
    params = [p for n, p in model.named_parameters() if "lora_B" in n]
    loss, _ = task.loss_with_metrics(model, batch)
    got = torch.autograd.grad(loss, params)
    lp = completion_logps(model, batch, 1.0)
    surrogate = -(((lp * completion).sum(1) / completion.sum(1)) * batch["advantages"]).mean()
    want = torch.autograd.grad(surrogate, params)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_each_prompt_runs_once_with_the_full_pass_log_probs_and_gradients(tiny_llama_dir: Path) -> None:
    """Groups of G answers to one prompt: the prompt's keys and values computed once give the full
    pass's log-probabilities and gradients (left-padded prompts of different lengths included)."""
    from lorakit.tasks.grpo import completion_logps

    model = _policy(tiny_llama_dir).train()
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(4, 30, (2, 6), generator=g)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[1, :3] = 0  # the second prompt is shorter: left padding
    answers = torch.randint(4, 30, (6, 4), generator=g)
    answer_mask = torch.tensor(
        [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    )
    batch = {
        "input_ids": torch.cat([prompts.repeat_interleave(3, 0), answers], 1),
        "attention_mask": torch.cat([prompt_mask.repeat_interleave(3, 0), answer_mask], 1),
        "completion_mask": answer_mask,
    }
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    full = completion_logps(model, batch, 0.8)
    shared = completion_logps(model, {**batch, "group_size": 3}, 0.8)
    m = answer_mask.bool()
    assert torch.allclose(full[m], shared[m], atol=1e-10)
    g_full = torch.autograd.grad((full * answer_mask).sum(), params)
    g_shared = torch.autograd.grad((shared * answer_mask).sum(), params)
    for a, b in zip(g_full, g_shared, strict=True):  # the sums over the G answers run in another order
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6 * float(a.abs().max()))


def test_generation_reads_each_prompt_once_and_answers_as_plain_generate(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    from lorakit.tasks.grpo import GRPO, GRPOTrainConfig

    task = GRPO()
    task.train_cfg = GRPOTrainConfig(rewards=[{"function": "length", "max_tokens": 2}])
    task.tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = _policy(tiny_llama_dir)
    ids = torch.randint(4, 30, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    shared = task.sample(model, ids, mask, greedy=True, max_new_tokens=5, group=3)
    plain = task.sample(
        model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), greedy=True, max_new_tokens=5
    )
    for a, b in zip(shared, plain, strict=True):
        assert torch.equal(a, b)


# ---- rewards -------------------------------------------------------------------------------------


def test_rewards_that_misbehave_are_one_line_errors_naming_them_and_the_row() -> None:
    rows = [{"__row__": 17}, {"__row__": 18}]
    with pytest.raises(RewardError, match=r"reward mine: returned 3 values for 4 completions"):
        checked_rewards([1.0, 2.0, 3.0], "mine", 4, rows, 2)
    with pytest.raises(RewardError, match=r"returned nan for completion 1 of data row 18"):
        checked_rewards([1.0, 2.0, 0.0, math.nan], "mine", 4, rows, 2)
    with pytest.raises(RewardError, match=r"returned 'yes' \(str\) for completion 0 of data row 17"):
        checked_rewards(["yes", 1.0, 1.0, 1.0], "mine", 4, rows, 2)
    with pytest.raises(RewardError, match=r"returned NoneType"):
        checked_rewards(None, "mine", 4, rows, 2)
    # None: the reward does not apply to that answer (TRL's convention)
    assert math.isnan(checked_rewards([None, 1, 2.5, 0], "mine", 4, rows, 2)[0])


def test_builtin_rewards_score_as_documented() -> None:
    from lorakit.tasks.grpo import RewardConfig, builtin_reward

    texts, ids = ["Positive.", " negative", "it is positive", "neutral"], [[1], [1, 2], [1, 2, 3, 4, 5], [1]]
    cols = {"label": [1, 0, 1, 1], "rx": ["^pos", "neg", "pos", "x"]}

    def run(names: list[str] | None = None, **spec: Any) -> list[float]:
        return builtin_reward(RewardConfig(**spec), names)(completions=texts, completion_ids=ids, **cols)

    # exact match after normalising case, spaces and a final full stop; label indices named
    assert run(["negative", "positive"], function="exact_match", column="label") == [1.0, 1.0, 0.0, 0.0]
    assert run(function="regex", pattern="(?i)posit") == [1.0, 0.0, 1.0, 0.0]
    assert run(function="regex", column="rx") == [0.0, 1.0, 1.0, 0.0]  # a pattern per row
    assert run(function="format", pattern="(?i)(positive|negative)\\.?") == [1.0, 1.0, 0.0, 0.0]
    assert run(function="length", max_tokens=2) == [0.0, 0.0, -1.5, 0.0]


def test_reward_config_problems_are_reported_together_at_load(
    tmp_path: Path, tiny_llama_dir: Path, rewards_py
) -> None:
    data = _jsonl(tmp_path / "p.jsonl", colour_prompts(8))
    bad = [
        {"function": "no_such_module_xyz:fn"},
        {"function": f"{rewards_py}:missing"},
        {"function": "regex", "pattern": "(unclosed"},
        {"adapter": "somewhere"},
        {"function": "exact_match"},
        {"function": "length", "max_tokens": 3, "adapter": "x"},
    ]
    with pytest.raises(ConfigError) as err:
        load_config(grpo_config(tmp_path, tiny_llama_dir, data, train={"rewards": bad}))
    text = str(err.value)
    for needle in (
        "importing no_such_module_xyz failed",
        "has no function 'missing'",
        "not a valid regular expression",
        "needs `label`",
        "exact_match reward needs `column`",
        "exactly one of `function`",
    ):
        assert needle in text, needle
    with pytest.raises(ConfigError, match="give at least one reward"):
        load_config(grpo_config(tmp_path, tiny_llama_dir, data, train={"rewards": []}))


# ---- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    folder = tmp_path_factory.mktemp("grpo-run")
    (folder / "my_rewards.py").write_text(REWARD_FILE)
    data = _jsonl(folder / "prompts.jsonl", colour_prompts(64, kinds=2))
    rewards = [  # the length reward is logged beside, at weight 0 (it would fight the colour)
        {"function": f"{folder / 'my_rewards.py'}:colour_share", "name": "colour"},
        {"function": "length", "max_tokens": 3, "weight": 0.0},
    ]
    cfg = grpo_config(
        folder,
        tiny_llama_dir,
        data,
        data={"validation_size": 8, "test_size": 8},
        train={
            "epochs": 3,
            "learning_rate": 5e-2,
            "num_generations": 8,
            "beta": 0.05,
            "rewards": rewards,
            "score_base_model": True,
            "generation_samples": 8,
        },
    )
    return lorakit.train(cfg, progress=False)


def test_grpo_climbs_the_reward_and_logs_what_rl_users_watch(grpo_run) -> None:
    assert grpo_run.test["reward"] > grpo_run.test["reward"] - 1  # the keys exist
    metrics = json.loads((grpo_run.run_dir / "metrics.json").read_text())
    before, after = metrics["test_base_model"]["reward_colour"], metrics["test"]["reward_colour"]
    assert after > before + 0.3, (before, after)
    train_rows = [r for r in grpo_run.history if r["split"] == "train"]
    for key in (
        "reward",
        "reward_std",
        "reward_colour",
        "reward_length",
        "frac_reward_zero_std",
        "kl",
        "clip_ratio",
        "completion_length",
        "truncated_ratio",
    ):
        assert all(key in r for r in train_rows), key
    assert train_rows[-1]["reward"] > train_rows[0]["reward"]
    assert metrics["best_metric"] == "reward"
    assert {"reward", "kl_sampled", "completion_length"} <= set(metrics["test"])
    report = (grpo_run.run_dir / "report" / "index.html").read_text()
    assert "Sample answers" in report and "curves.png" in report


def test_compare_pairs_the_rewards_of_the_adapter_and_its_base(grpo_run) -> None:
    """`lorakit compare RUN`: the test prompts' rewards with and without the adapter, paired by prompt."""
    from lorakit.evaluation.paired import compare_runs, format_table

    [c] = compare_runs(grpo_run.run_dir)
    assert c.paired and c.examples == 8 and c.metrics[0].metric == "reward"
    m = c.metrics[0]
    metrics = json.loads((grpo_run.run_dir / "metrics.json").read_text())
    assert m.a == pytest.approx(metrics["test_base_model"]["reward"]) and m.b == pytest.approx(
        metrics["test"]["reward"]
    )
    assert m.low <= m.diff <= m.high and m.p_value is None
    assert f"{m.diff:+.3f}" in format_table([c]) and "points" not in format_table([c])


def test_generate_and_merge_work_for_grpo_adapters(grpo_run, tmp_path: Path) -> None:
    from lorakit.cli import main
    from lorakit.serving.prediction import generate

    out = generate(grpo_run.run_dir, ["what colour is the sky ?"], max_new_tokens=4)
    assert out[0]["input"] == "what colour is the sky ?" and isinstance(out[0]["output"], str)
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(grpo_run.run_dir), "hello"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(grpo_run.run_dir), "--merge", str(tmp_path / "merged")])
    assert exit_.value.code in (0, None)
    assert (tmp_path / "merged" / "config.json").is_file()


def test_a_reward_that_raises_stops_training_with_one_line(
    tmp_path: Path, tiny_llama_dir: Path, rewards_py, capsys
) -> None:
    from lorakit.cli import main

    data = _jsonl(tmp_path / "p.jsonl", colour_prompts(16))
    cfg = grpo_config(
        tmp_path, tiny_llama_dir, data, train={"rewards": [{"function": f"{rewards_py}:broken"}]}
    )
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(cfg), "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: reward train.rewards.0 (broken):"), err
    assert "ZeroDivisionError: division by zero on data row" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_classifier_adapter_is_a_reward_model(
    tmp_path: Path, tiny_llama_dir: Path, tiny_bert_dir: Path, sentiment_csv: Path
) -> None:
    from conftest import make_config

    (tmp_path / "judge").mkdir()
    judge = lorakit.train(
        make_config(tmp_path / "judge", tiny_bert_dir, sentiment_csv, train={"epochs": 1}), progress=False
    )
    data = _jsonl(tmp_path / "p.jsonl", colour_prompts(16))
    rewards = [{"adapter": str(judge.run_dir), "label": "pos", "template": "{colour} {completion}"}]
    run = lorakit.train(
        grpo_config(tmp_path / "g", tiny_llama_dir, data, train={"rewards": rewards}), progress=False
    )
    samples = run.test["samples"]
    colour = {f"what colour is the {k} ?": v for k, v in COLOURS_OF.items()}  # each sample's row
    texts = [
        f"{colour[s['prompt'].split('user ')[1].split(' <|im_end|>')[0]]} {s['output']}" for s in samples
    ]
    direct = lorakit.predict(judge.run_dir, texts, top_k=2)
    for s, rec in zip(samples, direct, strict=True):
        want = next(a["score"] for a in rec["top_k"] if a["label"] == "pos")
        assert s["reward"] == pytest.approx(want, abs=1e-5)
    bad = [{"adapter": str(judge.run_dir), "label": "happy"}]
    with pytest.raises(RewardError, match="has no label 'happy'; choose one of"):
        lorakit.train(
            grpo_config(tmp_path / "h", tiny_llama_dir, data, train={"rewards": bad}), progress=False
        )
    assert not (tmp_path / "h" / "run").exists()


def test_num_iterations_reuses_each_batch_of_answers(
    tmp_path: Path, tiny_llama_dir: Path, rewards_py
) -> None:
    data = _jsonl(tmp_path / "p.jsonl", colour_prompts(24, kinds=2))  # 16 training prompts: 4 batches
    rewards = [{"function": f"{rewards_py}:colour_share"}]
    run = lorakit.train(
        grpo_config(
            tmp_path,
            tiny_llama_dir,
            data,
            train={
                "num_iterations": 2,
                "learning_rate": 5e-2,
                "num_generations": 8,
                "rewards": rewards,
                # fp32: under bf16 autocast the sampling pass and the training pass round differently
                "mixed_precision": "no",
            },
        ),
        progress=False,
    )
    train_rows = [r for r in run.history if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert any(r["clip_ratio"] > 0 for r in train_rows[1::2])  # second passes see ratios away from 1
    assert all(r["clip_ratio"] == 0 for r in train_rows[0::2])  # first passes: the ratio is exactly 1


@pytest.mark.slow  # `lorakit train` processes
def test_sigkill_and_resume_gives_the_uninterrupted_result(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Sampling draws from the random state: a resumed run samples the answers an uninterrupted one does."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    data = _jsonl(tmp_path / "p.jsonl", colour_prompts(40))
    settings = {
        "lora": {"dropout": 0.1},
        "train": {"epochs": 1, "save_every_steps": 2, "num_iterations": 2, "beta": 0.1, "num_threads": 2},
        "output": {"report": False},
    }
    reference = lorakit.train(grpo_config(tmp_path / "a", tiny_llama_dir, data, **settings), progress=False)
    expected = load_file(reference.adapter_dir / "adapter_model.safetensors")
    config = grpo_config(tmp_path / "b", tiny_llama_dir, data, **settings)
    run = tmp_path / "b" / "run"

    def newest() -> int:
        folder = run / "checkpoints"
        steps = [int(p.name.split("-")[-1]) for p in folder.glob("step-*")] if folder.is_dir() else []
        return max(steps, default=-1)

    codes = []
    for after in (2, 7):  # 16 optimizer steps in all
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorakit", "train", str(config), "--resume-or-start", "--no-progress"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while proc.poll() is None:
            if newest() >= after:
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
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-6, rtol=0), k
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("reward", "kl_sampled", "completion_length"):
        assert metrics["test"][key] == pytest.approx(reference.test[key], abs=1e-6), key
    assert "resumed from checkpoint" in (run / "train.log").read_text()
