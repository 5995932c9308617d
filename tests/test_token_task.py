"""Token classification on a tiny random BERT with data made here: reading (word/tag rows, CoNLL, character
spans), sub-word alignment, and every stage — check, train and exact resume, eval with entity F1 per type,
predict (entities with spans and scores), serve (its own OpenAPI models), the UI's run and try-it pages,
ONNX export, import of a plain-peft TOKEN_CLS adapter, and the registry."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

import lorakit
from lorakit.errors import DataError
from lorakit.tasks import get_task
from lorakit.training.events import Callback

PEOPLE = ["alice", "bob", "carol", "jackson", "dave"]  # "jackson" is two word pieces: jack ##son
PLACES = [["paris"], ["london"], ["new", "york"], ["rome"]]
ORGS = [["acme"], ["globex"], ["initech", "corp"]]
FILLER = ["lives", "in", "works", "at", "visited", "the", "office", "of", "today", "."]


def sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    """``PER lives in LOC .`` or ``PER works at ORG today .`` with BIO tags."""
    person = rng.choice(PEOPLE)
    if rng.random() < 0.5:
        other, kind, verb = rng.choice(PLACES), "LOC", ["lives", "in"]
    else:
        other, kind, verb = rng.choice(ORGS), "ORG", ["works", "at"]
    words = [person, *verb, *other, "today", "."]
    tags = ["B-PER", "O", "O", f"B-{kind}", *[f"I-{kind}"] * (len(other) - 1), "O", "O"]
    return words, tags


def rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [dict(zip(("tokens", "tags"), sentence(rng), strict=True)) for _ in range(n)]


@pytest.fixture(scope="module")
def ner_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 32, random weights) whose word-piece vocabulary splits "jackson"."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("ner-bert")
    words = sorted({w for p in PLACES + ORGS for w in p} | set(PEOPLE) | set(FILLER) | {"jack", "##son"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[w for w in words if w != "jackson"]]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def config(folder: Path, model: Path, train_file: Path, **sections: dict[str, Any]) -> Path:
    cfg: dict[str, Any] = {
        "task": "token-classification",
        "data": {"train": str(train_file), "validation_size": 16, "test_size": 16, "max_length": 32},
        "model": {"name_or_path": str(model)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 4, "batch_size": 8, "learning_rate": 2e-2, "logging_steps": 2, "seed": 7},
        "output": {"dir": str(folder / "run"), "tensorboard": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, ner_bert: Path) -> lorakit.training.TrainResult:
    folder = tmp_path_factory.mktemp("ner-run")
    data = write_jsonl(folder / "train.jsonl", rows(200))
    return lorakit.train(config(folder, ner_bert, data), progress=False)


# ---- reading and alignment ---------------------------------------------------------------------------


def test_conll_files_and_character_spans_read_as_words_and_tags(tmp_path: Path):
    from lorakit.tasks.token_classification import TokenClassificationData, read_conll, spans_to_tags

    conll = tmp_path / "a.conll"
    conll.write_text("-DOCSTART- -X- O O\n\nalice NNP B-PER\nlives VBZ O\n\nbob NNP B-PER\n")
    assert read_conll(conll, key="data.train") == [(["alice", "lives"], ["B-PER", "O"]), (["bob"], ["B-PER"])]
    conll.write_text("alice B-PER\nlives\n")
    with pytest.raises(DataError, match="line 2: expected a word and its tag"):
        read_conll(conll, key="data.train")

    words, tags = spans_to_tags(
        "Ada Lovelace lives in New York.",
        [{"start": 0, "end": 12, "label": "PER"}, {"start": 22, "end": 30, "label": "LOC"}],
        key="data.train",
        row=0,
    )
    assert words == ["Ada", "Lovelace", "lives", "in", "New", "York", "."]
    assert tags == ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"]

    spans = write_jsonl(
        tmp_path / "spans.jsonl",
        [{"text": "Bob works at Acme.", "entities": [{"start": 13, "end": 17, "label": "ORG"}]}],
    )
    ds = get_task("token-classification").read_data(
        str(spans), TokenClassificationData(train=str(spans)), key="data.train"
    )
    assert ds["tokens"] == [["Bob", "works", "at", "Acme", "."]] and ds["tags"] == [
        ["O", "O", "O", "B-ORG", "O"]
    ]


def test_bad_rows_are_one_line_errors_naming_the_row(tmp_path: Path, ner_bert: Path):
    good = rows(40)
    for bad, expect in (
        (
            {"tokens": ["alice", "lives"], "tags": ["B-PER"]},
            "row 40: 'tokens' and 'tags' must be non-empty lists of the same length",
        ),
        ({"tokens": ["alice"], "tags": ["PERSON"]}, "row 40: tag 'PERSON' is not BIO"),
    ):
        data = write_jsonl(tmp_path / "bad.jsonl", [*good, bad])
        with pytest.raises(DataError, match=expect):
            lorakit.check(config(tmp_path, ner_bert, data))


def test_labels_go_on_the_first_sub_word_only_unless_asked(ner_bert: Path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from lorakit.data.labels import LabelSpace
    from lorakit.tasks.token_classification import TokenClassificationData

    task, tok = get_task("token-classification"), AutoTokenizer.from_pretrained(ner_bert)
    space = LabelSpace(("O", "B-PER", "I-PER"))
    ds = Dataset.from_dict({"words": [["jackson", "lives"]], "tags": [["B-PER", "O"]], "tag_ids": [[1, 0]]})
    first = task.preprocess(ds, tok, TokenClassificationData(train="x"), space, key="t")[0]
    every = task.preprocess(
        ds, tok, TokenClassificationData(train="x", label_all_subwords=True), space, key="t"
    )[0]
    assert tok.convert_ids_to_tokens(first["input_ids"]) == ["[CLS]", "jack", "##son", "lives", "[SEP]"]
    assert first["labels"] == [-100, 1, -100, 0, -100]
    assert every["labels"] == [-100, 1, 2, 0, -100]  # the second piece of a B- word is I-


# ---- every stage ---------------------------------------------------------------------------------------


def test_check_reports_the_tags_and_entity_counts(tmp_path: Path, ner_bert: Path):
    plan = lorakit.check(config(tmp_path, ner_bert, write_jsonl(tmp_path / "t.jsonl", rows(120))))
    text = str(plan)
    assert "B-PER" in text and "tokens    mean" in text
    assert set(plan.label_counts["train"]) == {"PER", "LOC", "ORG"}


def test_training_learns_entities_and_scores_them_per_type(trained):
    test = json.loads((trained.run_dir / "metrics.json").read_text())["test"]
    assert test["entity_f1"] > 0.9, test
    assert set(test["per_type"]) == {"PER", "LOC", "ORG"}
    assert all(0 <= v["f1"] <= 1 and v["support"] > 0 for v in test["per_type"].values())
    report = (trained.run_dir / "report" / "index.html").read_text()
    assert "Entities per type: test" in report and "entity_f1" in report


def test_eval_on_a_conll_file_reports_entity_f1_per_type(trained, tmp_path: Path):
    conll = tmp_path / "held-out.conll"
    conll.write_text(
        "\n\n".join(
            "\n".join(f"{w} {t}" for w, t in zip(r["tokens"], r["tags"], strict=True))
            for r in rows(30, seed=5)
        )
    )
    m = lorakit.evaluate(trained.run_dir, str(conll))
    assert m["examples"] == 30 and m["entity_f1"] > 0.9 and set(m["per_type"]) == {"PER", "LOC", "ORG"}
    assert "Entities per type" in (Path(m["output_dir"]) / "report" / "index.html").read_text()


def test_predict_gives_entities_with_character_spans_and_scores(trained):
    text = "Jackson works at Initech Corp today."
    (record,) = lorakit.predict(trained.adapter_dir, [text])
    got = {(e["label"], e["text"]) for e in record["entities"]}
    assert got == {("PER", "Jackson"), ("ORG", "Initech Corp")}
    for e in record["entities"]:
        assert text[e["start"] : e["end"]] == e["text"] and 0 < e["score"] <= 1
    get_task("token-classification").prediction_model.model_validate(record)


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)  # what `lorakit ui`'s Stop and a scheduler send


def test_a_stopped_run_resumes_to_the_uninterrupted_adapter(tmp_path: Path, ner_bert: Path):
    data = write_jsonl(tmp_path / "t.jsonl", rows(80))
    quick = {"epochs": 2, "save_every_steps": 3, "eval_every_steps": 4}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = lorakit.train(config(tmp_path / "a", ner_bert, data, train=quick), progress=False)
    cfg = config(tmp_path / "b", ner_bert, data, train=quick)
    with pytest.raises(lorakit.LorakitError, match="stopped"):
        lorakit.train(cfg, progress=False, callbacks=[StopAt(5)])
    resumed = lorakit.train(cfg, progress=False, resume=True)
    a, b = (
        load_file(whole.adapter_dir / "adapter_model.safetensors"),
        load_file(resumed.adapter_dir / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    ma, mb = (json.loads((r.run_dir / "metrics.json").read_text())["test"] for r in (whole, resumed))
    assert ma["entity_f1"] == mb["entity_f1"] and ma["loss"] == mb["loss"]


def test_served_with_its_own_request_and_response_models(trained):
    from fastapi.testclient import TestClient

    from lorakit.serving import Engine, create_app

    engine = Engine([f"ner={trained.adapter_dir}"], window_ms=1)
    try:
        client = TestClient(create_app(engine))
        r = client.post(
            "/v1/predict",
            json={"adapter": "ner", "inputs": ["Alice lives in Paris today.", "Bob works at Acme."]},
        )
        assert r.status_code == 200, r.text
        first = r.json()["predictions"][0]["entities"]
        assert [(e["label"], e["text"], e["start"], e["end"]) for e in first] == [
            ("PER", "Alice", 0, 5),
            ("LOC", "Paris", 15, 20),
        ]
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert {"Entity", "TokenPrediction"} <= set(schema)
        assert set(schema["Entity"]["properties"]) == {"label", "text", "start", "end", "score"}
        chat = client.post(
            "/v1/chat/completions", json={"model": "ner", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.status_code == 404 and "use /v1/predict" in chat.json()["error"]["message"]
    finally:
        engine.close()


def test_ui_run_page_and_try_it(trained, tmp_path: Path):
    from fastapi.testclient import TestClient

    from lorakit.ui import create_app

    shutil.copytree(trained.run_dir, tmp_path / "runs" / "ner", ignore=shutil.ignore_patterns("checkpoint*"))
    ui = TestClient(create_app(tmp_path), base_url="http://127.0.0.1:7860")
    page = ui.get("/runs/ner")
    assert page.status_code == 200 and "Entities per type: test" in page.text and "per-class" in page.text
    tried = ui.get("/runs/ner/try")
    assert tried.status_code == 200 and '"text-spans"' in tried.text
    r = ui.post("/api/runs/ner/predict", json={"inputs": ["Carol visited Rome today."], "top_k": 1})
    assert r.status_code == 200, r.text
    assert {e["label"] for e in r.json()["predictions"][0]["entities"]} == {"PER", "LOC"}


def test_onnx_export_matches_the_adapter(trained, tmp_path: Path):
    from lorakit.export.merge import export

    result = export(trained.adapter_dir, tmp_path / "merged", onnx=True)
    assert (
        result.merged_diff <= result.tolerance
        and result.onnx_diff is not None
        and result.onnx_diff <= result.tolerance
    )
    assert (tmp_path / "merged" / "model.onnx").is_file()


def test_a_plain_peft_token_cls_adapter_imports_and_predicts(ner_bert: Path, tmp_path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForTokenClassification

    from lorakit.adapters.importing import import_adapter

    base = AutoModelForTokenClassification.from_pretrained(ner_bert, num_labels=3)
    peft_model = get_peft_model(
        base, LoraConfig(task_type="TOKEN_CLS", r=4, target_modules=["query", "value"])
    )
    peft_model.save_pretrained(tmp_path / "peft")
    r = import_adapter(
        tmp_path / "peft", base_model=str(ner_bert), labels=["O", "B-PER", "I-PER"], out=tmp_path / "imported"
    )
    assert r.task == "token-classification" and r.labels == ["O", "B-PER", "I-PER"]
    (record,) = lorakit.predict(tmp_path / "imported", ["alice lives in paris ."])
    assert all(
        e["label"] == "PER" for e in record["entities"]
    )  # an untrained head: any PER spans, well-formed


def test_published_to_the_registry_and_pulled_back(trained, tmp_path: Path):
    from lorakit.adapters.registry import Registry

    reg = Registry(tmp_path / "registry")
    version, _ = reg.publish(trained.run_dir, "ner")
    pulled = reg.pull(f"ner:{version.version}", tmp_path / "pulled")
    (a,), (b,) = (lorakit.predict(p, ["Dave works at Globex today."]) for p in (trained.adapter_dir, pulled))
    assert a["entities"] == b["entities"] and {e["label"] for e in a["entities"]} == {"PER", "ORG"}
