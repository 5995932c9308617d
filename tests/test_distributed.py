"""Data-parallel training under torchrun: 2 CPU processes (gloo) against 1 process, same global batch.

Tolerance: adapter tensors within 1e-4 (measured: ~2e-7; the two runs differ only in the order of
float additions when gradients are averaged), held-out metrics equal up to 1e-5.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

import lorakit
from conftest import CHAT_WORDS, make_config, make_lm_config, make_texts, run_cli, write_csv

TOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]


ENV = dict(os.environ, OMP_NUM_THREADS="1")
FSDP_ENV = dict(ENV, ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")


def torchrun_cmd(config: Path, *extra: str, nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "lorakit",
        "train",
        str(config),
        "--no-progress",
        *extra,
    ]


def torchrun(
    config: Path, *extra: str, nproc: int = 2, timeout: float = 300, env: dict[str, str] = ENV
) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_cmd(config, *extra, nproc=nproc), capture_output=True, text=True, timeout=timeout, env=env
    )


def tree(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if "report" not in p.parts)


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    worst = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    assert worst < TOL, f"adapters differ by {worst}"
    assert any(float(ta[k].abs().max()) > 0 for k in ta if "lora_B" in k)  # training moved B off zero


def text_config(folder: Path, tiny_bert_dir: Path, csv: Path, batch_size: int, **train: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # 96 training rows: batches of 8 -> 12 global steps an epoch, 24 in all;
    # eval batches of 5 split unevenly over 2 ranks.
    # fp32: the runs are compared to 1e-4, and bf16 rounds differently when the batch is split over ranks
    return make_config(
        folder,
        tiny_bert_dir,
        csv,
        model={"dropout": 0.0},
        train={
            "batch_size": batch_size,
            "eval_batch_size": 5,
            "epochs": 2,
            "save_every_steps": 4,
            "mixed_precision": "no",
            **train,
        },
        output={"dir": str(folder / "run"), "tensorboard": False},
    )


@pytest.fixture(scope="module")
def text_runs(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path
) -> tuple[Path, subprocess.CompletedProcess]:
    """The same run on 1 process (batch 8; this one, no need to start another) and on 2 processes
    (batch 4 each): 24 steps, checkpoints every 4."""
    root = tmp_path_factory.mktemp("ddp")
    csv = write_csv(root / "reviews.csv", make_texts(160))
    lorakit.train(text_config(root / "one", tiny_bert_dir, csv, batch_size=8), progress=False)  # in here
    two = text_config(root / "two", tiny_bert_dir, csv, batch_size=4)  # per process: 2 x 4 = 8
    return root, torchrun(two)


@pytest.mark.slow  # torchrun: three processes
def test_two_processes_match_one_with_the_same_global_batch(
    text_runs: tuple[Path, subprocess.CompletedProcess],
) -> None:
    root, r2 = text_runs
    assert r2.returncode == 0, r2.stderr[-3000:]
    run1, run2 = root / "one" / "run", root / "two" / "run"
    assert_same_adapter(run1 / "adapter", run2 / "adapter")
    m1, m2 = json.loads((run1 / "metrics.json").read_text()), json.loads((run2 / "metrics.json").read_text())
    assert m1["steps"] == m2["steps"] == 24
    for split in ("validation", "test"):
        assert m2[split]["accuracy"] == m1[split]["accuracy"]
        assert abs(m2[split]["loss"] - m1[split]["loss"]) < 1e-5
        # gathered evaluation: every example scored exactly once
        assert sum(c["support"] for c in m2[split]["per_class"].values()) == 32

    # exactly one set of artifacts: the same files as the single-process run, nothing else written
    assert tree(run2) == tree(run1)
    assert sorted(p.name for p in (root / "two").iterdir()) == ["config.yaml", "run"]
    log = (run2 / "train.log").read_text()
    assert log.count("data: {") == 1 and "2 processes (batch 4 per process, 8 per step)" in log
    assert r2.stdout.count("adapter: ") == 1  # rank 0 prints the summary, once


@pytest.mark.slow  # torchrun: three processes
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_resume_after_a_kill(
    text_runs: tuple[Path, subprocess.CompletedProcess],
    tmp_path: Path,
    tiny_bert_dir: Path,
    engine: str,
    capsys: pytest.CaptureFixture,
) -> None:
    root, _ = text_runs
    env = (
        FSDP_ENV if engine == "fsdp" else ENV
    )  # FSDP: the checkpoint holds the optimizer state gathered from both shards
    config = text_config(tmp_path, tiny_bert_dir, root / "reviews.csv", batch_size=4)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        torchrun_cmd(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    target = random.Random().choice([4, 8, 12])
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if any(int(p.name.split("-")[1]) >= target for p in (run / "checkpoints").glob("step-*")):
            # the launcher and both workers (torchrun starts them in sessions of their own), mid-run
            for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert not (run / "adapter").exists() and (run / "checkpoints").is_dir(), "the run was not killed mid-way"

    # A 2-process checkpoint cannot be resumed by 1 process (this one): its batches would differ.
    wrong = run_cli(capsys, "train", str(config), "--resume", "--no-progress")
    assert wrong.returncode == 2 and "trained on 2 process(es), not 1" in wrong.stderr

    resumed = torchrun(config, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint" in (run / "train.log").read_text()
    assert_same_adapter(root / "two" / "run" / "adapter", run / "adapter")


def lm_config(folder: Path, tiny_llama_dir: Path, data: Path, batch_size: int) -> Path:
    folder.mkdir(parents=True)
    return make_lm_config(
        folder,
        tiny_llama_dir,
        data,
        train={
            "batch_size": batch_size,
            "epochs": 2,
            "eval_batch_size": 3,
            "generation_samples": 5,
            "mixed_precision": "no",
        },
        output={"dir": str(folder / "run"), "tensorboard": False, "report": False},
    )


@pytest.fixture(scope="module")
def lm_single_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple[Path, Path]:
    """(chat data, the run folder of 1 process at batch 8) for the 2-process language-model tests."""
    root = tmp_path_factory.mktemp("lm")
    rng = random.Random(0)
    rows = [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.choices(CHAT_WORDS[5:20], k=rng.randint(2, 8)))},
                {
                    "role": "assistant",
                    "content": " ".join(rng.choices(CHAT_WORDS[14:18], k=rng.randint(1, 6))),
                },
            ]
        }
        for _ in range(56)
    ]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lorakit.train(lm_config(root / "one", tiny_llama_dir, data, batch_size=8), progress=False)  # in here
    return data, root / "one"


@pytest.mark.slow  # torchrun: three processes
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_language_model_weights_tokens(
    lm_single_run: tuple[Path, Path], tmp_path: Path, tiny_llama_dir: Path, engine: str
) -> None:
    # Answers of 1 to 6 tokens: the ranks' halves of a batch hold different numbers of label tokens,
    # so the loss must be weighted by tokens (not rows) to match one process. Under FSDP generation
    # runs in step on both ranks (5 prompts: one rank answers a padding prompt).
    data, one = lm_single_run
    r2 = torchrun(
        lm_config(tmp_path / "two", tiny_llama_dir, data, batch_size=4),
        env=FSDP_ENV if engine == "fsdp" else ENV,
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert_same_adapter(one / "run" / "adapter", tmp_path / "two" / "run" / "adapter")
    m1 = json.loads((one / "run" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "run" / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert m2[split]["tokens"] == m1[split]["tokens"]
        assert abs(m2[split]["loss"] - m1[split]["loss"]) < 1e-5
        assert [s["output"] for s in m2[split]["samples"]] == [s["output"] for s in m1[split]["samples"]]


@pytest.mark.slow  # torchrun: three processes
def test_a_bad_run_folder_stops_every_rank_with_one_message(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path
) -> None:
    config = text_config(tmp_path, tiny_bert_dir, sentiment_csv, batch_size=4)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("not ours")
    r = torchrun(config, timeout=120)
    assert r.returncode != 0
    assert (
        r.stderr.count("error: output.dir: ") == 2 and "--overwrite" in r.stderr
    )  # rank 0 found it; both ranks stop, none hangs
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["keep.txt"]


@pytest.mark.slow  # accelerate launch: three processes
def test_two_fsdp_processes_match_one(
    text_runs: tuple[Path, subprocess.CompletedProcess], tmp_path: Path, tiny_bert_dir: Path
) -> None:
    """`accelerate launch` with the shipped FSDP config: weights sharded over the ranks, checkpoints
    every 4 steps gather the optimizer state; the same result as 1 process."""
    root, _ = text_runs
    config = text_config(tmp_path, tiny_bert_dir, root / "reviews.csv", batch_size=4)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
    ]
    r = subprocess.run(
        [*launch, "-m", "lorakit", "train", str(config), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run1, run2 = root / "one" / "run", tmp_path / "run"
    assert_same_adapter(run1 / "adapter", run2 / "adapter")
    m1, m2 = json.loads((run1 / "metrics.json").read_text()), json.loads((run2 / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert m2[split]["accuracy"] == m1[split]["accuracy"]
        assert abs(m2[split]["loss"] - m1[split]["loss"]) < 1e-5
    assert tree(run2) == tree(run1)
    assert "sharded with FSDP over 2 processes" in (run2 / "train.log").read_text()


def test_deepspeed_configs_are_refused_not_silently_replaced(
    write_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lorakit
    from lorakit.errors import LorakitError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(LorakitError, match="DeepSpeed is not supported.*distributed_type FSDP"):
        lorakit.train(write_config(), progress=False)


def test_fsdp_block_classes_and_a_wrong_one(tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from lorakit.errors import LorakitError
    from lorakit.runtime import distributed

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    assert "BertLayer" in distributed.block_classes(model)
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")
    with pytest.raises(
        LorakitError, match=r"names LlamaDecoderLayer, which this model does not have; use .*BertLayer"
    ):
        distributed.wrap(model, distributed.World(0, 2, 0, sharded=True), torch.device("cpu"))


def test_fsdp_padding_gives_every_rank_as_many_forward_passes() -> None:
    from lorakit.runtime.distributed import World, padding, shard

    for n in range(0, 12):
        for size in (2, 3, 4):
            counts = [
                len(shard(list(range(n)), World(r, size, r, True))) + padding(n, World(r, size, r, True))
                for r in range(size)
            ]
            assert len(set(counts)) == 1 and counts[0] == -(-n // size)
            assert (
                padding(n, World(size - 1, size, 0, False)) == 0
            )  # DDP: evaluation runs the bare model, no padding


def test_a_checkpoint_resumes_only_under_the_engine_that_wrote_it(tiny_bert_dir: Path) -> None:
    """FSDP checkpoints hold the optimizer state gathered by parameter name; DDP ones by position."""
    import torch

    from lorakit.errors import LorakitError
    from lorakit.runtime import distributed

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(LorakitError, match="the checkpoint was written with FSDP and this run is without it"):
        distributed.load_optimizer_state(model, optimizer, {"fsdp_full": {}}, distributed.World())
    with pytest.raises(LorakitError, match="the checkpoint was written without FSDP and this run is with it"):
        distributed.load_optimizer_state(
            model, optimizer, optimizer.state_dict(), distributed.World(0, 2, 0, sharded=True)
        )
