"""LoHa and LoKr (``lora.method``) and per-layer ranks (``lora.rank_pattern``) through every stage, on tiny
random models: a 2-stage ResNet (3x3 convolutions, BatchNorm) and the 2-layer ViT of conftest.

Each trained adapter is checked the ways a LoRA one is: plain peft loads the folder with identical logits,
the verified merge reports its difference, an interrupted run resumes to identical tensors, the server
answers mixed batches right (without LoRA's gathered kernel), and what a stage cannot do is one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import make_config, make_image_config, make_images, run_cli, train_until_stopped
from lorakit.errors import ConfigError, ModelError

STEPS = {"max_steps": 3, "batch_size": 8, "logging_steps": 1, "num_threads": 2}
DATA = {"validation_size": 4, "test_size": 4}
METHODS = {
    # method -> the lora section of its runs (effective_conv2d: the Tucker form of the 3x3 kernels)
    "loha": {"method": "loha", "r": 4, "alpha": 8, "effective_conv2d": True},
    "lokr": {"method": "lokr", "r": 4, "alpha": 8},
}


@pytest.fixture(scope="module")
def tiny_resnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-stage ResNet for 32x32 inputs (channels 8 and 16, 3x3 convolutions), random weights."""
    from transformers import ResNetConfig, ResNetModel, ViTImageProcessor

    folder = tmp_path_factory.mktemp("tiny-resnet")
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    torch.manual_seed(0)
    ResNetModel(config).save_pretrained(folder)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("images") / "train", per_class=10, size=32)


@pytest.fixture(scope="module")
def models(tiny_resnet_dir: Path, tiny_vit_dir: Path) -> dict[str, Path]:
    return {"cnn": tiny_resnet_dir, "vit": tiny_vit_dir}


def _config(folder: Path, model: Path, images: Path, lora: dict[str, Any], **sections: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train = {**STEPS, **sections.pop("train", {})}
    return make_image_config(folder, model, images, data=DATA, lora=lora, train=train, **sections)


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path], images: Path
) -> dict[tuple[str, str], Any]:
    """One trained run per (method, model): 3 steps each."""
    root = tmp_path_factory.mktemp("runs")
    return {
        (method, kind): lorakit.train(_config(root / f"{method}-{kind}", model, images, lora), progress=False)
        for method, lora in METHODS.items()
        for kind, model in models.items()
    }


def _inputs(kind: str) -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_adapter_loads_in_plain_peft_with_identical_logits(runs, models, method: str, kind: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    run = runs[method, kind]
    peft_cfg = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    meta = json.loads((run.adapter_dir / "lorakit.json").read_text())
    assert peft_cfg["peft_type"] == method.upper() and meta["lora"]["method"] == method
    assert meta["lora"]["effective_conv2d"] == (method == "loha")
    assert 0 < run.trainable_params < run.total_params
    labels = meta["label_space"]["id2label"]
    base = AutoModelForImageClassification.from_pretrained(
        models[kind], num_labels=len(labels), id2label={int(k): v for k, v in labels.items()}
    )
    plain = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()
    ours = lorakit.Predictor.from_adapter(run.adapter_dir).loaded.model
    x = _inputs(kind)
    with torch.no_grad():
        want = plain(pixel_values=x).logits
        assert torch.allclose(ours(pixel_values=x).logits, want, atol=1e-6)  # ours: channels-last
        with plain.disable_adapter():  # the adapter changed the model: it was trained
            assert not torch.allclose(plain(pixel_values=x).logits, want)


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_is_verified_and_prints_the_difference(runs, tmp_path: Path, capsys, method: str) -> None:
    run = runs[method, "cnn"]
    out = run_cli(capsys, "export", str(run.run_dir), "--merge", str(tmp_path / "merged"))
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if "|unmerged - merged| logit difference" in x)
    diff = float(line.split("difference on")[1].split(":")[1].split()[0])
    assert diff < 1e-6, line
    provenance = json.loads((tmp_path / "merged" / "lorakit-export.json").read_text())
    assert provenance and not any(p.name.startswith("adapter_") for p in (tmp_path / "merged").iterdir())


def _stopped_then_resumed(config: Path, monkeypatch: pytest.MonkeyPatch, at_step: int) -> Path:
    """Train, stopped by SIGTERM during optimizer step ``at_step`` (a checkpoint exists), then resume."""
    train_until_stopped(config, monkeypatch, at_step=at_step)
    run = config.parent / "run"
    assert (run / "checkpoints").is_dir() and not (run / "adapter").exists()
    return lorakit.train(config, resume=True, progress=False).adapter_dir


@pytest.mark.parametrize(("method", "kind"), [("loha", "cnn"), ("lokr", "vit")])
def test_stopped_run_resumes_to_identical_tensors(
    models, images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, kind: str
) -> None:
    lora = {**METHODS[method], "rank_pattern": {}}
    train = {"max_steps": 4, "save_every_steps": 2}
    whole = lorakit.train(
        _config(tmp_path / "whole", models[kind], images, lora, train=train), progress=False
    )
    resumed = _stopped_then_resumed(
        _config(tmp_path / "stopped", models[kind], images, lora, train=train), monkeypatch, at_step=3
    )
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(("hada_" in k or "lokr_" in k) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rank_pattern_lands_in_the_adapter_config_and_the_tensor_shapes(
    models, images, tmp_path: Path
) -> None:
    lora = {
        "r": 4,
        "alpha": 8,
        "rank_pattern": {"layers.1.mlp.fc2": 2},
        "alpha_pattern": {"1.mlp.fc2": 4},
    }
    cfg = _config(tmp_path, models["vit"], images, {**lora, "target_modules": ["q_proj", "v_proj", "fc2"]})
    run = lorakit.train(cfg, progress=False)
    peft_cfg = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert peft_cfg["rank_pattern"] == {"layers.1.mlp.fc2": 2}
    assert peft_cfg["alpha_pattern"] == {"1.mlp.fc2": 4}
    meta = json.loads((run.adapter_dir / "lorakit.json").read_text())
    assert meta["lora"]["rank_pattern"] == {"layers.1.mlp.fc2": 2}
    shapes = {
        k: tuple(v.shape) for k, v in load_file(str(run.adapter_dir / "adapter_model.safetensors")).items()
    }
    ranks = {k.split(".lora_A")[0]: s[0] for k, s in shapes.items() if ".lora_A." in k}
    assert ranks and {r for k, r in ranks.items() if k.endswith("layers.1.mlp.fc2")} == {2}
    assert {r for k, r in ranks.items() if not k.endswith("layers.1.mlp.fc2")} == {4}
    # the same pattern on LoKr (peft's rank_pattern for LyCORIS): the rank-2 factor of that layer
    lokr = {
        **METHODS["lokr"],
        "target_modules": ["q_proj", "fc2"],
        "rank_pattern": {"layers.1.mlp.fc2": 2},
    }
    run = lorakit.train(_config(tmp_path / "lokr", models["vit"], images, lokr), progress=False)
    tensors = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
    w2a = {k: v.shape for k, v in tensors.items() if k.endswith("lokr_w2_a")}
    assert {s[1] for k, s in w2a.items() if "layers.1.mlp.fc2" in k} == {2}


def test_a_pattern_that_matches_no_adapted_layer_is_an_error_listing_them(
    models, images, tmp_path: Path
) -> None:
    cfg = _config(tmp_path, models["cnn"], images, {**METHODS["loha"], "rank_pattern": {"no_such_layer": 8}})
    with pytest.raises(ModelError) as exc:
        lorakit.train(cfg, progress=False)
    msg = str(exc.value)
    assert "lora.rank_pattern: 'no_such_layer' matches no adapted layer" in msg
    assert "resnet.encoder.stages.0.layers.0.layer.0.convolution" in msg and "\n" not in msg


def test_lora_only_settings_with_loha_are_refused_at_load_all_at_once(models, images, tmp_path: Path) -> None:
    lora = {
        "method": "loha",
        "use_dora": True,
        "use_rslora": True,
        "init": "pissa",
        "dropout": 0.1,
        "bias": "all",
    }
    cfg = _config(tmp_path, models["cnn"], images, lora, train={"lora_plus_ratio": 16})
    with pytest.raises(ConfigError) as exc:
        lorakit.load_config(cfg)
    problems = exc.value.problems
    for key in ("use_dora", "use_rslora", "init", "dropout", "bias"):
        assert any(p.startswith(f"lora.{key}: ") and "LoHa does not have" in p for p in problems), problems
    lora = {"r": 4, "rank_pattern": {"a": 0, "b": 2}, "alpha_pattern": {"(": 1}}
    problems = _problems(_config(tmp_path / "b", models["cnn"], images, lora))
    assert any(p.startswith("lora.rank_pattern: 'a': 0: give ranks from 1 to 4096") for p in problems), (
        problems
    )
    assert any(p.startswith("lora.alpha_pattern: '('") and "not a valid regex" in p for p in problems)
    cfg = _config(tmp_path / "d", models["cnn"], images, METHODS["lokr"], train={"lora_plus_ratio": 16})
    assert _problems(cfg) == [
        "train.lora_plus_ratio: LoRA+ speeds up LoRA's B matrices, which LoKr does not have; remove it, "
        "or use lora.method: lora"
    ]
    cfg = _config(tmp_path / "c", models["cnn"], images, {"effective_conv2d": True})
    assert _problems(cfg) == [
        "lora.effective_conv2d: true applies to LoHa and LoKr only; set lora.method: loha or lokr, "
        "or remove it"
    ]


def _problems(cfg: Path) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        lorakit.load_config(cfg)
    return exc.value.problems


def test_check_cli_refuses_dora_with_lokr_in_one_line(models, images, tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path, models["cnn"], images, {"method": "lokr", "use_dora": True})
    out = run_cli(capsys, "check", str(cfg))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "lora.use_dora: True is a LoRA setting that LoKr does not have" in errors[0]


def test_server_runs_mixed_batches_per_adapter_and_merges_a_lone_one(runs, models, images, tmp_path) -> None:
    from lorakit.adapters.registry import Registry
    from lorakit.serving.engine import Engine

    loha, lokr = runs["loha", "cnn"], runs["lokr", "cnn"]
    other = lorakit.train(
        _config(
            tmp_path / "other",
            models["cnn"],
            images,
            METHODS["loha"],
            train={"seed": 3, "learning_rate": 5e-2},
        ),
        progress=False,
    )
    reg = Registry(tmp_path / "registry")
    reg.publish(other.adapter_dir, "other")
    files = [(images / "red" / "red_003.png").read_bytes(), (images / "blue" / "blue_004.png").read_bytes()]

    def answer(engine: Engine, name: str) -> list[Any]:
        return engine.submit(name, engine.encode(name, files)).result(timeout=60)

    solo = Engine([f"first={loha.adapter_dir}"], window_ms=0)
    try:
        assert solo._merged and solo.store is None  # one adapter: merged, no gathered kernel
        want_first = answer(solo, "first")
    finally:
        solo.close()
    e = Engine([f"first={loha.adapter_dir}"], registry=reg.root, window_ms=200)
    try:
        futures = {n: e.submit(n, e.encode(n, files)) for n in ("first", "other", "first")}
        got = {n: f.result(timeout=60) for n, f in futures.items()}
        assert not e.mixed_ok and e.stats.loads == 2
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got["first"], want_first, strict=True))
        assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(got["other"], want_first, strict=True))
        alone = Engine([f"other={other.adapter_dir}"], window_ms=0)
        try:
            want_other = answer(alone, "other")
        finally:
            alone.close()
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got["other"], want_other, strict=True))
        with pytest.raises(lorakit.LorakitError, match="is a LoKr adapter; this server serves LoHa adapters"):
            e.add(f"lokr={lokr.adapter_dir}", paths=True)
    finally:
        e.close()
    with pytest.raises(lorakit.LorakitError, match="LoHa adapter: its weights are held in float32"):
        Engine([f"first={loha.adapter_dir}"], adapter_dtype="bfloat16")


def test_vllm_and_the_llama_cpp_lora_file_refuse_lycoris_in_one_line(runs) -> None:
    from types import SimpleNamespace

    from lorakit.export.gguf import lora_pairs
    from lorakit.export.vllm import vllm_problems

    run = runs["lokr", "vit"]
    meta = json.loads((run.adapter_dir / "lorakit.json").read_text())
    as_lm = SimpleNamespace(
        meta=meta, adapter_dir=run.adapter_dir, task=SimpleNamespace(cli_command="generate")
    )
    assert vllm_problems(as_lm, max_lora_rank=64) == [
        f"{run.adapter_dir.name}: vLLM serves LoRA adapters only; this is a LoKr adapter "
        "(lora.method: lokr): use export --merge, or retrain with lora.method: lora"
    ]
    assert lora_pairs(None, meta) == (
        {},
        "LoKr adapters have no llama.cpp LoRA form (the merged model carries them)",
    )


def test_text_classification_trains_and_reloads_with_loha(
    tiny_bert_dir: Path, sentiment_csv: Path, tmp_path
) -> None:
    cfg = make_config(
        tmp_path, tiny_bert_dir, sentiment_csv, lora={"method": "loha", "r": 4, "alpha": 8}, train=STEPS
    )
    run = lorakit.train(cfg, progress=False)
    meta = json.loads((run.adapter_dir / "lorakit.json").read_text())
    assert meta["lora"]["method"] == "loha"
    predictor = lorakit.Predictor.from_adapter(run.adapter_dir)
    assert len(predictor(["a fine film", "a dull film"])) == 2
