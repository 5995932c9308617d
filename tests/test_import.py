"""`lorakit import`: adapters written by plain peft (no lorakit.json) become lorakit adapters that
predict, generate and export exactly as plain peft does; adapters that do not fit are one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lorakit.adapters.importing import import_adapter
from lorakit.cli import main
from lorakit.errors import AdapterError, LorakitError


def _randomise_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA B starts at zero (the adapter changes nothing): give it weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _peft_classifier(base_dir: Path, out: Path, **lora: object) -> torch.nn.Module:
    """What the peft + Trainer notebooks write: a SEQ_CLS LoRA adapter on a base with a new head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    model = get_peft_model(
        base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], **lora)
    )
    _randomise_lora(model)
    model.save_pretrained(out)
    return model.eval()


def _peft_lm(base_dir: Path, out: Path) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(
        base,
        LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
    )
    _randomise_lora(model, seed=1)
    model.save_pretrained(out)
    return model.eval()


def test_classifier_from_plain_peft_predicts_like_peft(tmp_path: Path, tiny_bert_dir: Path, capsys) -> None:
    from transformers import AutoTokenizer

    peft_model = _peft_classifier(tiny_bert_dir, tmp_path / "peft")
    assert not (tmp_path / "peft" / "lorakit.json").exists()
    # Before: lorakit refuses it; after: lorakit.json in the layout training writes, card replaced.
    with pytest.raises(SystemExit) as e:
        main(["predict", str(tmp_path / "peft"), "great film"])
    assert e.value.code == 2 and "not written by lorakit" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["import", str(tmp_path / "peft"), "--labels", "neg,pos"])
    assert e.value.code in (0, None)
    assert "labels (--labels): neg, pos" in capsys.readouterr().out
    meta = json.loads((tmp_path / "peft" / "lorakit.json").read_text())
    assert meta["task"] == "text-classification" and meta["label_space"] == {
        "id2label": {"0": "neg", "1": "pos"}
    }
    assert meta["base_model"]["resolved"] == str(tiny_bert_dir.resolve()) and meta["base_model"][
        "fingerprint"
    ].startswith("sha256:")
    assert meta["lora"]["target_modules"] == ["query", "value"] and meta["lora"]["modules_to_save"] == [
        "classifier",
        "score",
    ]
    assert meta["imported"]["peft_task_type"] == "SEQ_CLS" and meta["parameters"]["trainable"] > 0
    assert "imported by lorakit" in (tmp_path / "peft" / "README.md").read_text()

    texts = ["the film was great and moving", "boring dull plot"]
    from lorakit.serving.prediction import predict

    got = predict(tmp_path / "peft", texts, top_k=2, device="cpu")
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        want = torch.softmax(peft_model(**tok(texts, return_tensors="pt", padding=True)).logits, -1)
    for row, probs in zip(got, want, strict=True):
        assert {a["label"]: a["score"] for a in row["top_k"]} == pytest.approx(
            {"neg": float(probs[0]), "pos": float(probs[1])}, abs=1e-5
        )

    # The imported adapter merges and publishes like a trained one.
    from lorakit.adapters.registry import Registry
    from lorakit.export.merge import export

    assert export(tmp_path / "peft", tmp_path / "merged").merged_diff <= 1e-4
    version, new = Registry(tmp_path / "registry").publish(tmp_path / "peft", "imported-clf")
    assert (
        new
        and version.task == "text-classification"
        and version.base_fingerprint == meta["base_model"]["fingerprint"]
    )


def test_labels_come_from_the_base_config_and_the_copy_leaves_the_source(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    base = tmp_path / "named-base"
    shutil.copytree(tiny_bert_dir, base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(
        json.dumps(
            cfg | {"id2label": {"0": "negative", "1": "positive"}, "label2id": {"negative": 0, "positive": 1}}
        )
    )
    _peft_classifier(base, tmp_path / "peft")
    r = import_adapter(tmp_path / "peft", out=tmp_path / "imported")
    assert r.labels == ["negative", "positive"] and r.labels_from == "the base config's id2label"
    assert not (
        tmp_path / "peft" / "lorakit.json"
    ).exists()  # --out copies; the source stays as peft wrote it
    assert sorted(p.name for p in (tmp_path / "imported").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorakit.json",
    ]
    with pytest.raises(LorakitError, match="already exists; pass --overwrite"):
        import_adapter(tmp_path / "peft", out=tmp_path / "imported")
    with pytest.raises(AdapterError, match="already has lorakit.json"):
        import_adapter(tmp_path / "imported")


def test_adapters_that_do_not_fit_are_one_line_errors(tmp_path: Path, tiny_bert_dir: Path, capsys) -> None:
    from transformers import BertConfig, BertModel

    _peft_classifier(tiny_bert_dir, tmp_path / "peft")
    cases = [
        (["--labels", "a,b,c"], "size mismatch"),  # three names, a two-row head
        (["--task", "causal-lm"], "have no module in it"),  # BERT as a decoder has no classifier
    ]
    other = tmp_path / "wider-bert"
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=40, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
        )
    ).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_bert_dir / name, other / name)
    cases.append((["--labels", "a,b", "--base", str(other)], "does not fit base model"))
    capsys.readouterr()  # the set-up's own output (weight-loading bars) is not the command's
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["import", str(tmp_path / "peft"), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "peft" / "lorakit.json").exists()  # nothing written

    cfg_file = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(cfg | {"task_type": None}))
    with pytest.raises(LorakitError, match="pass --task"):
        import_adapter(tmp_path / "peft")
    cfg_file.write_text(json.dumps(cfg | {"peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="IA3 adapter; lorakit imports LoRA adapters only"):
        import_adapter(tmp_path / "peft")


def test_causal_lm_from_plain_peft_generates_and_merges_like_peft(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    from transformers import AutoTokenizer

    peft_model = _peft_lm(tiny_llama_dir, tmp_path / "peft")
    r = import_adapter(tmp_path / "peft")  # task from peft's CAUSAL_LM, base from base_model_name_or_path
    assert r.task == "causal-lm" and r.labels is None and r.base_model == str(tiny_llama_dir)

    from lorakit.serving.prediction import generate

    prompt = "what colour is the sky ?"
    got = generate(tmp_path / "peft", [prompt], max_new_tokens=6, device="cpu")[0]["output"]
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=ids,
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    want = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert got and got == want

    from lorakit.export.merge import export

    assert export(tmp_path / "peft", tmp_path / "merged").merged_diff <= 1e-4


def test_adapter_for_more_layers_than_the_base_has_is_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    _peft_lm(tiny_llama_dir, tmp_path / "peft")
    shallow = tmp_path / "one-layer"
    shutil.copytree(tiny_llama_dir, shallow)
    config = LlamaConfig.from_pretrained(shallow)
    config.num_hidden_layers = 1
    LlamaForCausalLM(config).save_pretrained(shallow)
    with pytest.raises(AdapterError, match="have no module in it"):
        import_adapter(tmp_path / "peft", base_model=str(shallow))
