"""Image classification end to end on a tiny random ViT and on the zoo's EfficientNet-Lite0.

Train a few steps on generated PNGs, reload the adapter in plain peft with identical logits, predict
on files and on a URL served by a local HTTP server; corrupt, greyscale and RGBA inputs; idx data;
csv / parquet sources; the transforms; BatchNorm handling.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit
from conftest import make_image_config, make_images
from lorakit.cli import main
from lorakit.data.images import AugmentConfig, BadImage, ImageSpec, ImageTransforms, load_image, read_idx
from lorakit.errors import DataError


def lite0_classifier(*labels: str) -> tuple[torch.nn.Module, list[str]]:
    """The zoo's EfficientNet-Lite0 with a new head for ``labels``, at 32 px."""
    from lorakit.models import zoo

    return zoo.build_classifier(
        "zoo:efficientnet-lite0",
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        image_size=32,
    )


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_images(tmp_path_factory.mktemp("images") / "train")
    (folder / "red" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory, tiny_vit_dir: Path, image_folder: Path):
    folder = tmp_path_factory.mktemp("vit-run")
    return lorakit.train(
        make_image_config(folder, tiny_vit_dir, image_folder, data={"max_bad_images": 0.05}), progress=False
    )


@pytest.fixture()
def http_root(tmp_path: Path):
    """A local HTTP server over ``tmp_path``; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_vit_run_learns_and_writes_a_complete_adapter(vit_run) -> None:
    meta = json.loads((vit_run.adapter_dir / "lorakit.json").read_text())
    assert meta["task"] == "image-classification"
    assert meta["label_space"] == {"id2label": {"0": "blue", "1": "red"}}
    assert meta["lora"]["target_modules"] == ["q_proj", "v_proj"]  # the ViT default: query / value
    assert meta["lora"]["modules_to_save"] == ["classifier"]
    assert (
        meta["data"]["sizes"]["train"] + meta["data"]["sizes"]["validation"] + meta["data"]["sizes"]["test"]
        == 48
    )  # corrupt one skipped
    assert meta["data"]["stats"]["image"]["size"] == 32
    evals = [r for r in vit_run.history if r["split"] == "validation"]
    assert len(evals) == 3 and evals[-1]["loss"] < evals[0]["loss"]
    assert vit_run.test["accuracy"] >= 0.75, vit_run.test
    log = (vit_run.run_dir / "train.log").read_text()
    assert "skipped 1 unreadable image(s) of 49" in log and "corrupt.png" in log
    assert (vit_run.run_dir / "report" / "confusion_0.png").is_file()
    for j, m in enumerate(vit_run.test["mistakes"]):  # the report shows each mistake as a thumbnail
        assert Path(m["image"]).is_file() and m["true"] != m["predicted"]
        assert (vit_run.run_dir / "report" / f"mistakes_1_{j}.png").is_file()
    card = (vit_run.adapter_dir / "README.md").read_text()
    assert "AutoModelForImageClassification" in card and "AutoTokenizer" not in card


def test_plain_peft_gives_identical_logits(vit_run, image_folder: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    meta = json.loads((vit_run.adapter_dir / "lorakit.json").read_text())
    base = AutoModelForImageClassification.from_pretrained(
        meta["base_model"]["resolved"],
        num_labels=2,
        id2label={0: "blue", 1: "red"},
        label2id={"blue": 0, "red": 1},
    )
    plain = PeftModel.from_pretrained(base, str(vit_run.adapter_dir)).eval()
    ours = lorakit.Predictor.from_adapter(vit_run.adapter_dir)
    spec = ours.loaded.processor
    t = ImageTransforms(spec, AugmentConfig())
    x = torch.from_numpy(
        np.stack([t(load_image(p), train=False) for p in sorted((image_folder / "red").glob("red_00*.png"))])
    )
    with torch.no_grad():
        a = plain(pixel_values=x).logits
        b = ours.loaded.model(pixel_values=x.contiguous(memory_format=torch.channels_last)).logits
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_predict_files_greyscale_rgba_and_url(
    vit_run, image_folder: Path, http_root: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from PIL import Image

    Image.open(image_folder / "blue" / "blue_005.png").save(tmp_path / "served.jpg")
    inputs = [
        str(image_folder / "red" / "red_000.png"),
        str(image_folder / "blue" / "blue_001.png"),
        f"{http_root}/served.jpg",
    ]
    assert Image.open(inputs[0]).mode == "L" and Image.open(inputs[1]).mode == "RGBA"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(vit_run.run_dir), *inputs, "--top-k", "2", "--json"])
    assert exc.value.code in (0, None)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in rows] == inputs
    assert all(len(r["top_k"]) == 2 and abs(sum(a["score"] for a in r["top_k"]) - 1) < 1e-5 for r in rows)
    assert rows[2]["label"] == "blue"


def test_predict_on_a_corrupt_or_missing_image_is_one_line(
    vit_run, image_folder: Path, http_root: str, capsys: pytest.CaptureFixture
) -> None:
    for bad, expect in [
        (str(image_folder / "red" / "corrupt.png"), "cannot be decoded"),
        ("/no/such.png", "does not exist"),
        (f"{http_root}/missing.png", "could not download"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(["predict", str(vit_run.run_dir), bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and expect in err[0], err


def test_too_many_bad_images_stop_before_training(tmp_path: Path, tiny_vit_dir: Path) -> None:
    folder = make_images(tmp_path / "imgs", per_class=6)
    for i in range(3):
        (folder / "blue" / f"broken{i}.png").write_bytes(b"junk")
    cfg = make_image_config(tmp_path, tiny_vit_dir, folder, data={"validation_size": 2, "test_size": 0})
    with pytest.raises(
        DataError, match=r"3 of 15 images \(20.0%\) cannot be read.*raise data.max_bad_images"
    ):
        lorakit.train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_csv_with_relative_paths_and_parquet_with_an_image_feature(
    tmp_path: Path, tiny_vit_dir: Path
) -> None:
    from datasets import Dataset, Image

    folder = make_images(tmp_path / "data" / "imgs", per_class=10)
    rows = [(str(p.relative_to(tmp_path / "data")), p.parent.name) for p in sorted(folder.rglob("*.png"))]
    csv_path = tmp_path / "data" / "images.csv"
    csv_path.write_text("file,kind\n" + "".join(f"{f},{k}\n" for f, k in rows))
    plan = lorakit.check(
        make_image_config(
            tmp_path,
            tiny_vit_dir,
            csv_path,
            data={"image_column": "file", "label_column": "kind", "validation_size": 4, "test_size": 0},
        )
    )
    assert plan.sizes == {"train": 16, "validation": 4} and plan.labels == ["blue", "red"]
    assert plan.target_modules == ["q_proj", "v_proj"] and plan.modules_to_save == ["classifier"]

    ds = Dataset.from_dict(
        {"img": [str(tmp_path / "data" / f) for f, _ in rows], "label": [k for _, k in rows]}
    ).cast_column("img", Image())
    ds.to_parquet(str(tmp_path / "images.parquet"))
    cfg = make_image_config(
        tmp_path,
        tiny_vit_dir,
        tmp_path / "images.parquet",
        data={"image_column": "img", "validation_size": 4, "test_size": 0},
        train={"max_steps": 2},
    )
    result = lorakit.train(cfg, progress=False)
    assert result.history[-1]["split"] == "validation"


def _write_idx(folder: Path, images: np.ndarray, labels: np.ndarray, stem: str = "train") -> Path:
    n, h, w = images.shape
    img = folder / f"{stem}-images-idx3-ubyte.gz"
    img.write_bytes(gzip.compress(struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes()))
    (folder / f"{stem}-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())
    )
    return img


def test_idx_reader_round_trips_pixels_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels, labels = rng.integers(0, 256, (5, 28, 28)), np.array([3, 1, 4, 1, 5])
    ds = read_idx(_write_idx(tmp_path, pixels, labels), key="data.train")
    assert ds["label"] == [3, 1, 4, 1, 5]
    assert np.array_equal(np.asarray(load_image(ds[2]["image"]).convert("L")), pixels[2])
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">II", 2049, 4) + bytes(4))
    )
    with pytest.raises(DataError, match="not a matching idx3 images / idx1 labels pair"):
        read_idx(tmp_path / "train-images-idx3-ubyte.gz", key="data.train")


def test_transforms_augment_train_only_reproducibly() -> None:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    t = ImageTransforms(
        ImageSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_pct=0.875), AugmentConfig(crop_scale=(0.3, 1.0))
    )
    e1, e2 = t(img, train=False), t(img, train=False)
    assert e1.shape == (3, 32, 32) and e1.dtype == np.float32 and np.array_equal(e1, e2)
    assert e1.min() >= -1.0 and e1.max() <= 1.0
    a, b, c = t(img, train=True, seed=1), t(img, train=True, seed=1), t(img, train=True, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    off = ImageTransforms(ImageSpec(32, (0.5,) * 3, (0.5,) * 3), AugmentConfig(enabled=False))
    assert np.array_equal(off(img, train=True, seed=1), off(img, train=False))


def test_load_image_converts_modes(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("LA", (4, 4), (100, 0)).save(tmp_path / "la.png")
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert load_image(str(tmp_path / "la.png")).mode == "RGB"
    assert load_image(np.zeros((4, 4), dtype=np.uint8)).mode == "RGB"
    with pytest.raises(BadImage, match="is not an image"):
        load_image(42)


# ---- the zoo: EfficientNet-Lite0 with real ImageNet weights ----------------------------------------


def test_zoo_efficientnet_trains_and_reloads_in_plain_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    from lorakit.models import zoo

    folder = make_images(tmp_path / "imgs", per_class=12)
    cfg = make_image_config(
        tmp_path,
        "zoo:efficientnet-lite0",
        folder,
        data={"image_size": 32, "validation_size": 4, "test_size": 4},
        train={"max_steps": 3, "batch_size": 8},
    )
    result = lorakit.train(cfg, progress=False)
    meta = json.loads((result.adapter_dir / "lorakit.json").read_text())
    assert meta["lora"]["target_modules"] == ["_conv_head", "_expand_conv", "_project_conv"]
    assert "backbone._fc" in meta["lora"]["modules_to_save"] and any(
        "_bn" in m for m in meta["lora"]["modules_to_save"]
    )
    assert meta["base_model"]["fingerprint"] == zoo.fingerprint("zoo:efficientnet-lite0")

    # Plain peft on the zoo model: the BatchNorm statistics learned in training come with the adapter.
    base, _ = lite0_classifier("blue", "red")
    plain = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    ours = lorakit.Predictor.from_adapter(result.adapter_dir)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            plain(pixel_values=x).logits,
            ours.loaded.model(pixel_values=x.contiguous(memory_format=torch.channels_last)).logits,
            atol=1e-5,
        )
    preds = ours([str(folder / "red" / "red_003.png")], top_k=2)
    assert {a["label"] for a in preds[0]["top_k"]} == {"blue", "red"}


def test_zoo_conv_swap_is_exact_and_freeze_keeps_batchnorm_statistics() -> None:
    from efficientnet_lite_pytorch import EfficientNet

    from lorakit.config.schema import LoraSettings
    from lorakit.models import modeling

    model, new = lite0_classifier("a", "b", "c")
    original = EfficientNet.from_name("efficientnet-lite0", num_classes=3, image_size=32)
    original.load_state_dict(model.backbone.state_dict())
    model.eval(), original.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, original(x))
    peft_model = modeling.apply_lora(
        model, LoraSettings(r=2, batch_norm="freeze"), task_type=None, new_modules=new
    )
    bn = model.backbone._bn0
    before = bn.running_mean.clone()
    peft_model.train()
    peft_model(pixel_values=torch.randn(4, 3, 32, 32) * 3, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    assert torch.equal(bn.running_mean, before)
    assert not any("_bn" in m for m in peft_model.peft_config["default"].modules_to_save)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_zoo_stride1_depthwise_convolutions_take_adapters_and_strided_ones_are_refused(method: str) -> None:
    """The stride-1 depthwise convolutions are plain ``nn.Conv2d`` (symmetric padding), so LoHa and LoKr
    adapt them with outputs of the right shape (peft's LoRA takes grouped convolutions only at a rank
    divisible by the groups); the four strided ones pad their own input, and naming them is one error
    whose suggested regex then works."""
    from lorakit.config.schema import LoraSettings
    from lorakit.errors import ModelError
    from lorakit.models import modeling

    model, new = lite0_classifier("a", "b")
    with pytest.raises(ModelError) as err:
        modeling.resolve_targets(model, LoraSettings(target_modules=["_depthwise_conv"]), new)
    message = str(err.value)
    assert all(f"_blocks.{i}._depthwise_conv" in message for i in (1, 3, 5, 11)), message
    assert "_blocks.2._depthwise_conv" not in message.split(" pad ")[0]
    regex = message.split("lora.target_modules: '")[1].split("'")[0]
    settings = LoraSettings(method=method, r=2, alpha=4, target_modules=regex, effective_conv2d=True)
    peft_model = modeling.apply_lora(model, settings, task_type=None, new_modules=new)
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith("base_layer")]
    assert sum("_depthwise_conv" in n for n in adapted) == 12
    for p in peft_model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)  # a non-zero update in every adapter
    peft_model.train()
    out = peft_model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert out.logits.shape == (2, 2)


def test_zoo_strided_depthwise_convolutions_run_in_fp32_under_cpu_autocast() -> None:
    """PyTorch's bf16 backward of a strided depthwise convolution is 6-19x its fp32 time on CPUs: the zoo
    runs those four in fp32 under autocast, and leaves them exactly as they were outside it."""
    from efficientnet_lite_pytorch import EfficientNet

    from lorakit.models import zoo

    model, _ = lite0_classifier("a", "b")
    swapped = [m for m in model.modules() if isinstance(m, zoo.Fp32OnCpuConv)]
    assert len(swapped) == 4 and all(m.stride == (2, 2) and m.groups == m.in_channels > 1 for m in swapped)
    original = EfficientNet.from_name("efficientnet-lite0", num_classes=2, image_size=32)
    assert original.load_state_dict(model.backbone.state_dict()).missing_keys == []  # same keys
    model.eval(), original.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, original(x))
        conv, h = swapped[0], torch.randn(2, swapped[0].in_channels, 16, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(h.bfloat16())
        assert y.dtype == torch.float32
        assert torch.equal(y, conv(h.bfloat16().float()))  # the fp32 convolution of the same input


def test_image_runs_keep_freed_memory_in_the_heap_unless_asked(
    tmp_path: Path, image_folder: Path, tiny_vit_dir: Path, write_config
) -> None:
    """Fixed-shape image batches do not fragment the heap: the image task leaves glibc's thresholds
    alone by default (no page faults per step); text tasks keep giving large freed tensors back."""
    images = lorakit.load_config(make_image_config(tmp_path, tiny_vit_dir, image_folder))
    assert images.train.release_memory is False
    asked = make_image_config(tmp_path, tiny_vit_dir, image_folder, train={"release_memory": True})
    assert lorakit.load_config(asked).train.release_memory is True
    assert lorakit.load_config(write_config()).train.release_memory is True


def test_zoo_model_for_a_text_task_and_unknown_entries_are_one_line_errors(
    write_config, capsys: pytest.CaptureFixture
) -> None:
    for name, expect in [
        ("zoo:efficientnet-lite0", "is an image-classification model from lorakit's zoo"),
        ("zoo:resnet9000", "is not in lorakit's model zoo; known: zoo:efficientnet-lite0"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(["check", str(write_config(model={"name_or_path": name}))])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and expect in err[0], err


def test_image_mistakes_are_shown_as_thumbnails(tmp_path: Path) -> None:
    from PIL import Image

    from lorakit.evaluation.report import _section
    from lorakit.tasks import get_task

    path = tmp_path / "shirt.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(path)
    task = get_task("image-classification")
    shown = task.describe({"image": str(path), "labels": 0}, None)
    assert shown == {"input": str(path), "image": str(path)}
    assert task.describe({"image": {"bytes": b"x", "path": None}}, None)["input"] == "<image bytes>"
    rows = [shown | {"true": "shirt", "predicted": "coat", "probability": 0.93}]
    rows.append(
        {
            "input": "gone.png",
            "image": str(tmp_path / "gone.png"),
            "true": "a",
            "predicted": "b",
            "probability": 0.6,
        }
    )
    (section,) = task.report_sections("test", {"mistakes": rows}, None)
    page = _section(section, tmp_path, "m")
    with Image.open(tmp_path / "m_0.png") as thumb:
        assert max(thumb.size) == 96
    assert '<img src="m_0.png"' in page and "gone.png" in page and not (tmp_path / "m_1.png").exists()
    assert "<td>shirt</td><td>coat</td><td>0.930</td>" in page
