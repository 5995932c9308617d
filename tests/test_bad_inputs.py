"""The bad-input catalogue: every user mistake gives one line saying what is wrong and how to fix it,
exit code 2, no traceback, and no existing file changed.

Each case builds its inputs in a fresh folder, snapshots every file there, runs the CLI in-process
(`lorakit.cli.main`) and checks the message, the exit code and that the snapshot is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import lorakit
from conftest import make_config, make_texts, write_csv
from lorakit.cli import main


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("finished")
    csv_path = write_csv(folder / "reviews.csv", make_texts(160))
    return lorakit.train(
        make_config(folder, tiny_bert_dir, csv_path, train={"epochs": 1}), progress=False
    ).run_dir


class Case:
    """Set-up returning CLI arguments, plus a fragment the one-line message must contain."""

    def __init__(self, name: str, setup: Callable[[Path, Callable, Path], list[str]], expect: str) -> None:
        self.name, self.setup, self.expect = name, setup, expect


def _cfg(ws: Path, write: Callable, **sections) -> str:
    return str(write(ws, **sections))


def _csv(ws: Path, name: str, rows: list[tuple], header=("text", "label")) -> str:
    return str(write_csv(ws / name, rows, header))


def _vit_folder(ws: Path, run: Path) -> str:
    """An image model (with a text tokenizer beside it, so that the model class is what fails)."""
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(ws / "vit")
    base = Path(json.loads((run / "adapter" / "lorakit.json").read_text())["base_model"]["resolved"])
    for f in base.glob("*token*"):
        shutil.copy(f, ws / "vit" / f.name)
    return str(ws / "vit")


def _copy_run(run: Path, ws: Path) -> Path:
    dest = ws / "run-copy"
    shutil.copytree(run, dest)
    return dest


CASES = [
    Case(
        "config file missing",
        lambda ws, w, run: ["train", str(ws / "nope.yaml")],
        "does not exist; pass the path of a YAML file",
    ),
    Case(
        "config not YAML",
        lambda ws, w, run: (
            ws.joinpath("bad.yaml").write_text("data: [x\n"),
            ["check", str(ws / "bad.yaml")],
        )[1],
        "not valid YAML at line",
    ),
    Case(
        "unknown config key",
        lambda ws, w, run: ["check", _cfg(ws, w, train={"epoch": 2})],
        "train.epoch: unknown key; did you mean 'epochs'?",
    ),
    Case(
        "non-positive rank",
        lambda ws, w, run: ["check", _cfg(ws, w, lora={"r": 0})],
        "lora.r = 0: input should be greater than or equal to 1",
    ),
    Case(
        "unknown task",
        lambda ws, w, run: ["check", _cfg(ws, w, task="translation")],
        "task = 'translation': input should be 'text-classification'",
    ),
    Case(
        "malformed --set",
        lambda ws, w, run: ["check", _cfg(ws, w), "--set", "epochs"],
        "expected section.key=value",
    ),
    Case(
        "missing data file",
        lambda ws, w, run: ["check", _cfg(ws, w, data={"train": str(ws / "none.csv")})],
        "data.train: file",
    ),
    Case(
        "empty data file",
        lambda ws, w, run: (
            ws.joinpath("e.csv").write_text(""),
            ["check", _cfg(ws, w, data={"train": str(ws / "e.csv")})],
        )[1],
        "is empty; it needs a header row",
    ),
    Case(
        "header-only data file",
        lambda ws, w, run: (
            ws.joinpath("h.csv").write_text("text,label\n"),
            ["check", _cfg(ws, w, data={"train": str(ws / "h.csv")})],
        )[1],
        "holds no rows",
    ),
    Case(
        "unknown data format",
        lambda ws, w, run: (
            ws.joinpath("d.xyz").write_text("x"),
            ["check", _cfg(ws, w, data={"train": str(ws / "d.xyz")})],
        )[1],
        "cannot tell the format",
    ),
    Case(
        "missing text column",
        lambda ws, w, run: ["check", _cfg(ws, w, data={"text_column": "review"})],
        "column 'review' not found; the data has text, label",
    ),
    Case(
        "missing label column",
        lambda ws, w, run: ["check", _cfg(ws, w, data={"label_column": "sentiment"})],
        "column 'sentiment' not found",
    ),
    Case(
        "label only in validation",
        lambda ws, w, run: [
            "check",
            _cfg(
                ws,
                w,
                data={"validation": _csv(ws, "v.csv", [("great film", "pos"), ("odd film", "neutral")])},
            ),
        ],
        "labels ['neutral'] are not among the training labels",
    ),
    Case(
        "single class",
        lambda ws, w, run: [
            "check",
            _cfg(ws, w, data={"train": _csv(ws, "one.csv", [(t, "pos") for t, _ in make_texts(40)])}),
        ],
        "found a single class ('pos')",
    ),
    Case(
        "empty text",
        lambda ws, w, run: [
            "check",
            _cfg(ws, w, data={"train": _csv(ws, "blank.csv", [*make_texts(40), ("", "pos")])}),
        ],
        "have empty or non-text 'text'",
    ),
    Case(
        "non-UTF-8 text",
        lambda ws, w, run: (
            ws.joinpath("latin.csv").write_bytes(
                b"text,label\n" + "caf\xe9 great,pos\n".encode("latin-1") * 20 + b"dull film,neg\n" * 20
            ),
            ["check", _cfg(ws, w, data={"train": str(ws / "latin.csv")})],
        )[1],
        "latin.csv' is not UTF-8 text; convert it",
    ),
    Case(
        "where matches nothing",
        lambda ws, w, run: ["check", _cfg(ws, w, data={"where": {"label": "meh"}})],
        "no rows match data.where",
    ),
    Case(
        "split larger than data",
        lambda ws, w, run: ["check", _cfg(ws, w, data={"validation_size": 1000})],
        "asks for 1000 held-out rows",
    ),
    Case(
        "too few label names",
        lambda ws, w, run: [
            "check",
            _cfg(
                ws,
                w,
                data={
                    "train": _csv(ws, "ints.csv", [(t, i % 3) for i, (t, _) in enumerate(make_texts(60))]),
                    "label_names": ["a", "b"],
                },
            ),
        ],
        "has 2 names but labels go up to 2",
    ),
    Case(
        "wrong target module",
        lambda ws, w, run: ["check", _cfg(ws, w, lora={"target_modules": ["q_proj"]})],
        "'q_proj' matches no layer of this bert model; its adaptable layers are named:",
    ),
    Case(
        "regex target matches nothing",
        lambda ws, w, run: ["check", _cfg(ws, w, lora={"target_modules": ".*attn.*"})],
        "matches no module",
    ),
    Case(
        "model folder missing",
        lambda ws, w, run: ["check", _cfg(ws, w, model={"name_or_path": str(ws / "no-model")})],
        "model.name_or_path: folder",
    ),
    Case(
        "model folder without config",
        lambda ws, w, run: (
            ws.joinpath("empty-model").mkdir(),
            ["check", _cfg(ws, w, model={"name_or_path": str(ws / "empty-model")})],
        )[1],
        "has no config.json",
    ),
    Case(
        "model type does not fit task",
        lambda ws, w, run: ["check", _cfg(ws, w, model={"name_or_path": _vit_folder(ws, run)})],
        "has no sequence-classification variant",
    ),
    Case(
        "cuda without a GPU",
        lambda ws, w, run: ["check", _cfg(ws, w, train={"device": "cuda"})],
        "no CUDA GPU is visible",
    ),
    Case(
        "fp16 on CPU",
        lambda ws, w, run: ["check", _cfg(ws, w, train={"mixed_precision": "fp16", "device": "cpu"})],
        "fp16 needs a GPU",
    ),
    Case(
        "unwritable output folder",
        lambda ws, w, run: (
            ws.joinpath("a-file").write_text("x"),
            ["train", _cfg(ws, w, output={"dir": str(ws / "a-file" / "run")})],
        )[1],
        "output.dir",
    ),
    Case(
        "existing run without --overwrite",
        lambda ws, w, run: ["train", _cfg(ws, w, output={"dir": str(_copy_run(run, ws))})],
        "already holds a run; pass --overwrite",
    ),
    Case(
        "--resume with --overwrite",
        lambda ws, w, run: ["train", _cfg(ws, w), "--resume", "--overwrite"],
        "--resume and --overwrite exclude each other",
    ),
    Case(
        "predict on a missing folder",
        lambda ws, w, run: ["predict", str(ws / "gone"), "text"],
        "does not exist; pass a run directory",
    ),
    Case(
        "predict on a folder without adapter",
        lambda ws, w, run: ["predict", str(ws), "text"],
        "is neither an adapter directory nor a run directory",
    ),
    Case(
        "pickled adapter weights",
        lambda ws, w, run: _pickled(ws, run),
        "pickled adapter_model.bin weights; lorakit loads only safetensors",
    ),
    Case("adapter without lorakit metadata", lambda ws, w, run: _no_meta(ws, run), "has no lorakit.json"),
    Case(
        "predict with no inputs",
        lambda ws, w, run: ["predict", str(_copy_run(run, ws))],
        "no inputs to predict",
    ),
    Case(
        "predict --file not UTF-8",
        lambda ws, w, run: (
            ws.joinpath("in.txt").write_bytes(b"\xff\xfe bad"),
            ["predict", str(_copy_run(run, ws)), "--file", str(ws / "in.txt")],
        )[1],
        "is not UTF-8 text",
    ),
    Case(
        "eval data missing label column",
        lambda ws, w, run: [
            "eval",
            str(_copy_run(run, ws)),
            "--data",
            _csv(ws, "nolabel.csv", [("great", "x")], header=("text", "y")),
        ],
        "--data: column 'label' not found",
    ),
    Case(
        "eval data with unknown label",
        lambda ws, w, run: [
            "eval",
            str(_copy_run(run, ws)),
            "--data",
            _csv(ws, "unk.csv", [("great", "pos"), ("meh", "neutral")]),
        ],
        "labels ['neutral'] are not among the training labels",
    ),
    Case(
        "adapter of a different base model",
        lambda ws, w, run: _other_base(ws, run),
        "differs from the one this adapter was trained on",
    ),
    Case("corrupt images", lambda ws, w, run: _corrupt_images(ws), "4 of 4 images (100.0%) cannot be read"),
    Case(
        "gradient checkpointing on a CNN",
        lambda ws, w, run: _checkpointed_cnn(ws),
        "train.gradient_checkpointing: zoo:efficientnet-lite0 does not support gradient checkpointing",
    ),
    Case(
        "gradient checkpointing share out of range",
        lambda ws, w, run: ["check", _cfg(ws, w, train={"gradient_checkpointing": 1.5})],
        "a share of the blocks must be above 0 and at most 1",
    ),
    Case(
        "exact match without generation",
        lambda ws, w, run: [
            "check",
            _cfg(ws, w, task="causal-lm", train={"metric_for_best": "exact_match", "generation_samples": 0}),
        ],
        "needs train.generation_samples > 0",
    ),
    Case(
        "export without --merge",
        lambda ws, w, run: ["export", str(_copy_run(run, ws)), "--onnx"],
        "export needs --merge OUT_DIR",
    ),
    Case(
        "export over an existing folder",
        lambda ws, w, run: (
            ws.joinpath("out").mkdir(),
            ws.joinpath("out", "x").write_text("x"),
            ["export", str(_copy_run(run, ws)), "--merge", str(ws / "out")],
        )[2],
        "already exists; pass --overwrite",
    ),
    Case(
        "export into the adapter",
        lambda ws, w, run: [
            "export",
            str(_copy_run(run, ws) / "adapter"),
            "--merge",
            str(ws / "run-copy" / "adapter"),
            "--overwrite",
        ],
        "holds the adapter being exported",
    ),
    Case(
        "publish without a target",
        lambda ws, w, run: ["publish", str(_copy_run(run, ws))],
        "publish needs --name NAME",
    ),
    Case(
        "publish with a path-like name",
        lambda ws, w, run: [
            "publish",
            str(_copy_run(run, ws)),
            "--name",
            "../../etc",
            "--registry",
            str(ws / "reg"),
        ],
        "adapter name '../../etc' is not valid",
    ),
    Case(
        "publish an incomplete adapter",
        lambda ws, w, run: ["publish", _no_meta(ws, run)[1], "--name", "x", "--registry", str(ws / "reg")],
        "has no lorakit.json",
    ),
    Case(
        "pull from a missing registry",
        lambda ws, w, run: ["registry", "pull", "x", "--registry", str(ws / "no-reg")],
        "no registry at",
    ),
    Case(
        "registry ref with a bad version",
        lambda ws, w, run: ["registry", "show", "x:v0", "--registry", str(ws / "no-reg")],
        "the version must be a positive number",
    ),
    Case("hub push in offline mode", lambda ws, w, run: _offline(ws, run), "offline mode is on"),
    # issue 25: what a new user still tripped over
    Case(
        "truncated adapter weights",
        lambda ws, w, run: _damage(ws, run, "adapter_model.safetensors", _cut),
        "adapter_model.safetensors' is damaged (truncated:",
    ),
    Case(
        "adapter without weights",
        lambda ws, w, run: _damage(ws, run, "adapter_model.safetensors", Path.unlink),
        "has no adapter_model.safetensors: the adapter is incomplete",
    ),
    Case(
        "adapter config not JSON",
        lambda ws, w, run: _damage(ws, run, "adapter_config.json", lambda p: p.write_text('{"r": 4,')),
        "adapter_config.json' is not valid JSON",
    ),
    Case(
        "adapter config with wrong keys",
        lambda ws, w, run: _damage(ws, run, "adapter_config.json", _drop_keys("r", "target_modules")),
        "adapter_config.json' lacks r, target_modules: it is not a PEFT LoRA config",
    ),
    Case(
        "lorakit metadata with wrong keys",
        lambda ws, w, run: _damage(ws, run, "lorakit.json", _drop_keys("task")),
        "lorakit.json' lacks task; the adapter's lorakit metadata is damaged",
    ),
    Case(
        "truncated base model weights",
        lambda ws, w, run: ["check", _cfg(ws, w, model={"name_or_path": _damaged_base(ws, run, _cut)})],
        "model.safetensors' is damaged (truncated:",
    ),
    Case(
        "corrupted base model weights",
        lambda ws, w, run: ["check", _cfg(ws, w, model={"name_or_path": _damaged_base(ws, run, _garble)})],
        "model.safetensors' is damaged (not a safetensors file",
    ),
    Case(
        "--resume with nothing to resume",
        lambda ws, w, run: ["train", _cfg(ws, w), "--resume"],
        "--resume: no run to resume in",
    ),
    Case(
        "--resume before the first checkpoint",
        lambda ws, w, run: _killed_early(ws, w),
        "has no checkpoint yet",
    ),
    Case(
        "rank not below a layer's width",
        lambda ws, w, run: ["check", _cfg(ws, w, lora={"r": 32})],
        "lora.r = 32 is not below the width of",
    ),
]


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:64] = bytes((i * 37 + 11) % 256 for i in range(64))  # the header length becomes nonsense
    path.write_bytes(bytes(data))


def _drop_keys(*keys: str) -> Callable[[Path], None]:
    def drop(path: Path) -> None:
        data = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in data.items() if k not in keys}))

    return drop


def _damage(ws: Path, run: Path, name: str, how: Callable[[Path], object]) -> list[str]:
    dest = _copy_run(run, ws)
    how(dest / "adapter" / name)
    return ["predict", str(dest), "text"]


def _damaged_base(ws: Path, run: Path, how: Callable[[Path], None]) -> str:
    src = Path(json.loads((run / "adapter" / "lorakit.json").read_text())["base_model"]["resolved"])
    shutil.copytree(src, ws / "base")
    how(ws / "base" / "model.safetensors")
    return str(ws / "base")


def _killed_early(ws: Path, write: Callable) -> list[str]:
    """A run folder as a run killed before its first checkpoint leaves it: config and log only."""
    config = write(ws)
    run = ws / "run"
    run.mkdir()
    shutil.copy(config, run / "config.yaml")
    (run / "train.log").write_text("")
    return ["train", str(config), "--resume"]


def _offline(ws: Path, run: Path) -> list[str]:
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"  # restored by the autouse fixture below
    return ["publish", str(_copy_run(run, ws)), "--hub", "me/adapter"]


@pytest.fixture(autouse=True)
def _keep_hub_env():
    import os

    saved = os.environ.get("HF_HUB_OFFLINE")
    yield
    if saved is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = saved


def _corrupt_images(ws: Path) -> list[str]:
    for cls in ("cat", "dog"):
        (ws / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            (ws / "imgs" / cls / f"{i}.png").write_bytes(b"\x89PNG not an image")
    cfg = {
        "task": "image-classification",
        "data": {"train": str(ws / "imgs")},
        "model": {"name_or_path": "zoo:efficientnet-lite0"},
        "output": {"dir": str(ws / "run")},
    }
    (ws / "img.yaml").write_text(yaml.safe_dump(cfg))
    return ["check", str(ws / "img.yaml")]


def _checkpointed_cnn(ws: Path) -> list[str]:
    from PIL import Image

    for cls in ("cat", "dog"):
        (ws / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(ws / "imgs" / cls / f"{i}.png")
    cfg = {
        "task": "image-classification",
        "data": {"train": str(ws / "imgs"), "validation_size": 0.5, "image_size": 32},
        "model": {"name_or_path": "zoo:efficientnet-lite0"},
        "train": {"gradient_checkpointing": True},
        "output": {"dir": str(ws / "run")},
    }
    (ws / "img.yaml").write_text(yaml.safe_dump(cfg))
    return ["check", str(ws / "img.yaml")]


def _pickled(ws: Path, run: Path) -> list[str]:
    dest = _copy_run(run, ws)
    (dest / "adapter" / "adapter_model.safetensors").rename(dest / "adapter" / "adapter_model.bin")
    return ["predict", str(dest), "text"]


def _no_meta(ws: Path, run: Path) -> list[str]:
    dest = _copy_run(run, ws)
    (dest / "adapter" / "lorakit.json").unlink()
    return ["predict", str(dest), "text"]


def _other_base(ws: Path, run: Path) -> list[str]:
    from transformers import BertConfig, BertModel

    dest = _copy_run(run, ws)
    meta_path = dest / "adapter" / "lorakit.json"
    meta = json.loads(meta_path.read_text())
    src = Path(meta["base_model"]["resolved"])
    other = ws / "other-base"
    BertModel(BertConfig.from_pretrained(src)).save_pretrained(other)  # same shapes, other weights
    for f in src.glob("*token*"):
        shutil.copy(f, other / f.name)
    meta["base_model"]["name_or_path"] = str(other)
    meta_path.write_text(json.dumps(meta))
    return ["predict", str(dest), "text"]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_catalogue_has_at_least_25_cases() -> None:
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(
    case: Case, tmp_path: Path, tiny_bert_dir: Path, finished_run: Path, capsys: pytest.CaptureFixture
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    data = write_csv(ws / "reviews.csv", make_texts(160))

    def write(folder: Path, **sections) -> Path:
        task = sections.pop("task", None)
        path = make_config(folder, tiny_bert_dir, data, **sections)
        if task:
            raw = yaml.safe_load(path.read_text())
            raw["task"] = task
            path.write_text(yaml.safe_dump(raw))
        return path

    args = case.setup(ws, write, finished_run)
    before = _snapshot(ws)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert case.expect in lines[0], lines[0]
    assert _snapshot(ws) == before, "an existing file was changed or a new one left behind"
