"""LoRA invariants on a tiny random BERT: what must hold whatever the hyperparameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit.config.schema import LoraSettings, ModelConfig
from lorakit.data.labels import LabelSpace
from lorakit.errors import ModelError
from lorakit.models import modeling
from lorakit.tasks import get_task

SPACE = LabelSpace(("neg", "pos"))


def _model(tiny_bert_dir: Path, **lora):
    task = get_task("text-classification")
    torch.manual_seed(0)
    base, new = task.load_model(ModelConfig(name_or_path=str(tiny_bert_dir)), str(tiny_bert_dir), SPACE)
    return modeling.apply_lora(
        base,
        LoraSettings(**({"r": 4, "alpha": 8, "dropout": 0.0} | lora)),
        task_type="SEQ_CLS",
        new_modules=new,
    ), new


def _batch(tiny_bert_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    enc = tok(["great film", "awful boring plot and acting"], padding=True, return_tensors="pt")
    return dict(enc) | {"labels": torch.tensor([1, 0])}


def _train_step(model, batch, lr: float = 0.05) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(**batch).loss.backward()
    opt.step()
    model.eval()


def test_head_is_new_and_trained_fully(tiny_bert_dir: Path) -> None:
    model, new = _model(tiny_bert_dir)
    assert new == ["classifier"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)


def test_default_targets_cover_attention_and_mlp(tiny_bert_dir: Path) -> None:
    model, _ = _model(tiny_bert_dir)
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert any(n.endswith("attention.self.query") for n in lora_layers)
    assert any(n.endswith("intermediate.dense") for n in lora_layers)
    assert not any("pooler" in n or "classifier" in n for n in lora_layers)


def test_wrong_target_lists_real_module_names(tiny_bert_dir: Path) -> None:
    with pytest.raises(ModelError) as exc:
        _model(tiny_bert_dir, target_modules=["qurey", "value"])
    msg = str(exc.value)
    assert "'qurey' (did you mean 'query'?)" in msg and "its adaptable layers are named:" in msg
    assert "key" in msg and "dense" in msg and "\n" not in msg
    with pytest.raises(ModelError, match="regex 'nothing.*' matches no module"):
        _model(tiny_bert_dir, target_modules="nothing.*")


def test_frozen_weights_do_not_move(tiny_bert_dir: Path) -> None:
    model, _ = _model(tiny_bert_dir)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _train_step(model, _batch(tiny_bert_dir))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)


def test_lora_b_starts_at_zero_so_adapter_starts_as_base(tiny_bert_dir: Path) -> None:
    model, _ = _model(tiny_bert_dir)
    batch = _batch(tiny_bert_dir)
    with torch.no_grad():
        with_adapter = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
    assert torch.allclose(with_adapter, base)


def test_disabled_adapter_gives_base_output_after_training(tiny_bert_dir: Path) -> None:
    model, _ = _model(tiny_bert_dir)
    batch = _batch(tiny_bert_dir)
    with torch.no_grad():
        base_before = model.get_base_model().bert(input_ids=batch["input_ids"]).last_hidden_state
    _train_step(model, batch)
    with torch.no_grad(), model.disable_adapter():
        base_after = model.get_base_model().bert(input_ids=batch["input_ids"]).last_hidden_state
    assert torch.equal(base_before, base_after)


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_merged_equals_unmerged(tiny_bert_dir: Path, extra: dict) -> None:
    model, _ = _model(tiny_bert_dir, **extra)
    batch = _batch(tiny_bert_dir)
    _train_step(model, batch)
    with torch.no_grad():
        unmerged = model(**batch).logits
        merged = model.merge_and_unload()(**batch).logits
    assert torch.allclose(unmerged, merged, atol=1e-5)


def test_rslora_scaling(tiny_bert_dir: Path) -> None:
    model, _ = _model(tiny_bert_dir, r=4, alpha=8, use_rslora=True)
    layer = next(m for n, m in model.named_modules() if n.endswith("attention.self.query"))
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_start_at_the_base_model(tiny_bert_dir: Path, init: str) -> None:
    """They move part of each weight into A and B, so the untrained adapter still computes the base model."""
    model, _ = _model(tiny_bert_dir, init=init)
    plain, _ = _model(tiny_bert_dir)
    batch = _batch(tiny_bert_dir)
    layer = next(m for n, m in model.named_modules() if n.endswith("attention.self.query"))
    assert layer.lora_B["default"].weight.abs().max() > 0  # not the zero start of default LoRA
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, plain(**batch).logits, atol=1e-4)


def test_lora_plus_gives_b_matrices_a_higher_learning_rate(tiny_bert_dir: Path) -> None:
    from lorakit.config.schema import RunConfig
    from lorakit.training import param_groups

    model, new = _model(tiny_bert_dir)
    cfg = RunConfig.model_validate(
        {
            "data": {"train": "x.csv"},
            "model": {"name_or_path": "m"},
            "train": {"learning_rate": 1e-3, "head_learning_rate": 5e-3, "lora_plus_ratio": 16},
        }
    )
    lr_of = {id(p): g["lr"] for g in param_groups(model, cfg.train, new) for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            want = 16e-3 if ".lora_B." in name else 5e-3 if "lora_" not in name else 1e-3
            assert lr_of[id(p)] == pytest.approx(want), name


def _adapted_blocks(model) -> set[int]:
    return {
        int(n.split("encoder.layer.")[1].split(".")[0])
        for n, _ in model.named_modules()
        if n.endswith("lora_A") and "encoder.layer." in n
    }


def test_layers_limits_lora_to_the_named_blocks(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    full, _ = _model(tiny_bert_dir)
    n = len(_adapted_blocks(full))
    assert n >= 2
    top, _ = _model(tiny_bert_dir, layers=[-1])
    assert _adapted_blocks(top) == {n - 1}
    targets = {
        name.rsplit(".lora_A", 1)[0].split(f"layer.{n - 1}.")[1]
        for name, _ in top.named_modules()
        if name.endswith("lora_A")
    }
    assert {
        "attention.self.query",
        "intermediate.dense",
        "output.dense",
    } <= targets  # every default target of that block
    assert any("classifier.modules_to_save" in k for k, p in top.named_parameters() if p.requires_grad)
    linear, _ = _model(tiny_bert_dir, layers=[0], target_modules="all-linear")
    assert _adapted_blocks(linear) == {0}
    # the saved adapter names its blocks: loading it gives the same model
    _train_step(top, _batch(tiny_bert_dir))
    top.save_pretrained(tmp_path / "a", safe_serialization=True)
    task = get_task("text-classification")
    base, _ = task.load_model(ModelConfig(name_or_path=str(tiny_bert_dir)), str(tiny_bert_dir), SPACE)
    loaded = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    batch = {k: v for k, v in _batch(tiny_bert_dir).items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, top(**batch).logits, atol=1e-6)
    assert _adapted_blocks(loaded) == {n - 1}


def test_layers_out_of_range_or_with_regex_targets_is_refused(tiny_bert_dir: Path) -> None:
    with pytest.raises(
        ModelError,
        match=r"lora.layers: 7, -9 out of range: this model has \d blocks \(bert.encoder.layer.0 to",
    ):
        _model(tiny_bert_dir, layers=[0, 7, -9])
    with pytest.raises(ModelError, match="lora.layers cannot be combined with a regex"):
        _model(tiny_bert_dir, layers=[0], target_modules=".*query")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_cpus_that_multiply_it_natively(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert modeling.pick_precision("auto", cpu) == (torch.bfloat16 if native else None)
    assert (
        modeling.pick_precision("no", cpu) is None and modeling.pick_precision("bf16", cpu) == torch.bfloat16
    )
    assert modeling.pick_precision("auto", torch.device("mps")) is None


def test_native_bf16_probe_agrees_with_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "flags" not in flags:
        pytest.skip("no /proc/cpuinfo flags here")
    words = set(flags.split())
    assert modeling.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & words)
