"""`lorakit export`: merged weights and ONNX give the adapter's outputs, for every task; failed checks
write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit
from conftest import (
    make_chat_rows,
    make_config,
    make_image_config,
    make_images,
    make_lm_config,
    make_texts,
    write_csv,
)
from lorakit.adapters.build import load_adapter
from lorakit.cli import main
from lorakit.export.common import ExportError
from lorakit.export.merge import export
from lorakit.serving.prediction import generate


def _assert_adapter_moves_outputs(run_dir: Path) -> list[dict[str, torch.Tensor]]:
    """The check batches, after making sure the adapter
    changes the outputs (else a merge test proves nothing)."""
    a = load_adapter(run_dir, device="cpu")
    batches = a.task.export_batches(a.processor, a.data_cfg)
    with torch.no_grad():
        on = a.model(**batches[0]).logits
        with a.model.disable_adapter():
            off = a.model(**batches[0]).logits
    assert (on - off).abs().max() > 1e-3
    return batches


def _assert_card(run_dir: Path, *, labels: bool = True) -> None:
    """Every adapter's model card: base model and hash, data,
    hyperparameters, metrics, labels, intended use, usage."""
    card = (run_dir / "adapter" / "README.md").read_text()
    meta = json.loads((run_dir / "adapter" / "lorakit.json").read_text())
    for part in (
        "library_name: peft",
        "## Base model",
        meta["base_model"]["fingerprint"],
        "## Data",
        "## Hyperparameters",
        "r=",
        "## Metrics",
        "| test |",
        "## Intended use",
        "With lorakit:",
        "lorakit ",
        "With plain peft:",
        "PeftModel.from_pretrained",
    ):
        assert part in card, part
    assert ("## Labels" in card) == labels
    assert ("lorakit predict ADAPTER_DIR" in card) == labels and ("lorakit generate ADAPTER_DIR" in card) == (
        not labels
    )


def _onnx_logits(path: Path, batch: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    return s.run(["logits"], {k: v.numpy() for k, v in batch.items() if k in names})[0]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path):
    folder = tmp_path_factory.mktemp("export-text")
    return lorakit.train(
        make_config(folder, tiny_bert_dir, write_csv(folder / "r.csv", make_texts(160))), progress=False
    )


def test_text_merge_and_onnx_reproduce_the_adapter(text_run, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _assert_adapter_moves_outputs(text_run.run_dir)
    _assert_card(text_run.run_dir)
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as e:
        main(["export", str(text_run.run_dir), "--merge", str(out), "--onnx"])
    assert e.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "largest |unmerged - merged| logit difference" in printed and "onnxruntime" in printed

    # Plain transformers, a new tokenizer call on new texts, against lorakit's own predictions.
    texts = [
        "the film was wonderful and moving",
        "boring",
        "a dull clumsy plot and the acting was weak really",
    ]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        merged = model(**enc).logits
    a = load_adapter(text_run.run_dir, device="cpu")
    with torch.no_grad():
        want = a.model(**enc).logits
    assert (merged - want).abs().max() <= 1e-4
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert np.abs(_onnx_logits(out / "model.onnx", dict(enc)) - want.numpy()).max() <= 1e-4

    meta = json.loads((out / "lorakit-export.json").read_text())
    assert (
        meta["verification"]["merged_max_abs_diff"] <= 1e-4
        and meta["verification"]["onnx_max_abs_diff"] <= 1e-4
    )
    card = (out / "README.md").read_text()
    assert "## Verification" in card and "AutoModelForSequenceClassification" in card and "model.onnx" in card
    assert not (out / "adapter_config.json").exists()  # a merged model, not an adapter


def test_failed_check_writes_nothing_and_existing_output_is_kept(
    text_run, tmp_path: Path, monkeypatch, capsys
) -> None:
    from lorakit.tasks.text_classification import TextClassification

    real = TextClassification.load_merged

    def broken(self, folder, loaded):  # a merge that went wrong: one weight off
        model = real(self, folder, loaded)
        with torch.no_grad():
            model.classifier.weight[0, 0] += 0.5
        return model

    monkeypatch.setattr(TextClassification, "load_merged", broken)
    out = tmp_path / "merged"
    with pytest.raises(ExportError, match="merge check failed"):
        export(text_run.run_dir, out)
    assert not out.exists() and not list(tmp_path.glob(".merged*"))

    monkeypatch.setattr(TextClassification, "load_merged", real)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["export", str(text_run.run_dir), "--merge", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1 and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "mine"

    export(text_run.run_dir, out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_image_vit_merge_and_onnx(tmp_path: Path, tiny_vit_dir: Path) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    run = lorakit.train(
        make_image_config(tmp_path, tiny_vit_dir, make_images(tmp_path / "img")), progress=False
    )
    batches = _assert_adapter_moves_outputs(run.run_dir)
    _assert_card(run.run_dir)
    r = export(run.run_dir, tmp_path / "merged", onnx=True)
    assert r.merged_diff <= 1e-4 and r.onnx_diff is not None and r.onnx_diff <= 1e-4

    model = AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
    assert AutoImageProcessor.from_pretrained(tmp_path / "merged").size["height"] == 32
    a = load_adapter(run.run_dir, device="cpu")
    x = torch.randn(5, 3, 32, 32)  # a batch size the export never saw
    with torch.no_grad():
        want = a.model(pixel_values=x).logits
        assert (model(pixel_values=x).logits - want).abs().max() <= 1e-4
    assert (
        np.abs(_onnx_logits(tmp_path / "merged" / "model.onnx", {"pixel_values": x}) - want.numpy()).max()
        <= 1e-4
    )
    assert len(batches) >= 2


def test_zoo_efficientnet_merge_and_onnx(tmp_path: Path) -> None:
    from lorakit.models import zoo

    images = make_images(tmp_path / "img", per_class=12)
    cfg = make_image_config(
        tmp_path,
        "zoo:efficientnet-lite0",
        images,
        data={"image_size": 32, "validation_size": 4, "test_size": 4},
        train={"max_steps": 4, "batch_size": 8},
    )
    run = lorakit.train(cfg, progress=False)
    _assert_adapter_moves_outputs(run.run_dir)
    r = export(run.run_dir, tmp_path / "merged", onnx=True)
    assert r.merged_diff <= 1e-4 and r.onnx_diff is not None and r.onnx_diff <= 1e-4
    # No Hugging Face format for zoo backbones: the merged state dict + zoo_config.json, rebuilt by lorakit.
    model = zoo.load_merged(tmp_path / "merged").eval()
    assert model.config.id2label == {0: "blue", 1: "red"}
    assert "zoo.load_merged" in (tmp_path / "merged" / "README.md").read_text()


def test_causal_lm_merge_generates_the_same_answers(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_chat_rows(48)))
    run = lorakit.train(
        make_lm_config(tmp_path, tiny_llama_dir, data, train={"epochs": 3, "generation_samples": 0}),
        progress=False,
    )
    _assert_adapter_moves_outputs(run.run_dir)
    _assert_card(run.run_dir, labels=False)

    # ONNX is refused for LMs with a one-line error, before anything is written.
    with pytest.raises(SystemExit) as e:
        main(["export", str(run.run_dir), "--merge", str(tmp_path / "lm-onnx"), "--onnx"])
    assert e.value.code == 2 and "--onnx" in capsys.readouterr().err and not (tmp_path / "lm-onnx").exists()

    r = export(run.run_dir, tmp_path / "merged")
    assert r.merged_diff <= 1e-4 and r.onnx_path is None
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "what colour is the grass ?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    merged_answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    adapter_answer = generate(run.run_dir, ["what colour is the grass ?"], max_new_tokens=4, device="cpu")[0][
        "output"
    ]
    assert adapter_answer and merged_answer == adapter_answer
