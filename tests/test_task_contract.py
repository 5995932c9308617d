"""The task contract: every stage asks only what ``Task`` declares, and an adapter asked for an answer its
task does not give is refused in one line, on every surface (CLI, HTTP server, the UI's API), for every
registered task.

One tiny adapter per task is trained once for the module (a few optimizer steps, no evaluation); a task
added to the registry without an entry in ``BUILDERS`` fails ``test_every_task_is_covered``.
"""

from __future__ import annotations

import ast
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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
from lorakit.cli import main
from lorakit.tasks import get_task, task_names
from lorakit.tasks.base import ANSWERS, Task

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"
QUICK = {"epochs": 1, "max_steps": 2, "generation_samples": 0}


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _text(folder: Path, models: dict[str, Path]) -> Path:
    data = write_csv(folder / "reviews.csv", make_texts(64))
    small = {"validation_size": 8, "test_size": 8}
    train = {"epochs": 1, "max_steps": 2}
    return make_config(folder, models["bert"], data, data=small, train=train, output={"report": False})


def _image(folder: Path, models: dict[str, Path]) -> Path:
    data = make_images(folder / "images", per_class=16)
    return make_image_config(
        folder, models["vit"], data, train={"epochs": 1, "max_steps": 2}, output={"report": False}
    )


def _chat(folder: Path, models: dict[str, Path]) -> Path:
    data = _jsonl(folder / "chat.jsonl", make_chat_rows(32))
    return make_lm_config(folder, models["llama"], data, train=QUICK, output={"report": False})


def _pairs(folder: Path, models: dict[str, Path]) -> Path:
    rows = [
        {"prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"], "rejected": "no"}
        for r in make_chat_rows(32)
    ]
    path = _chat(folder, models)
    raw = path.read_text().replace("causal-lm", "preference").replace("chat.jsonl", "pairs.jsonl")
    _jsonl(folder / "pairs.jsonl", rows)
    path.write_text(raw)
    return path


def _tags(folder: Path, models: dict[str, Path]) -> Path:
    words = [text.split() for text, _ in make_texts(64)]
    rows = [{"tokens": w, "tags": ["B-X", *["O"] * (len(w) - 1)]} for w in words]
    data = _jsonl(folder / "tags.jsonl", rows)
    path = make_config(
        folder,
        models["bert"],
        data,
        data={"validation_size": 8, "test_size": 8},
        train={"epochs": 1, "max_steps": 2},
        output={"report": False},
    )
    path.write_text(path.read_text().replace("text-classification", "token-classification"))
    return path


def _prompts(folder: Path, models: dict[str, Path]) -> Path:
    rows = [
        {"prompt": r["messages"][0]["content"], "answer": r["messages"][1]["content"]}
        for r in make_chat_rows(32)
    ]
    data = _jsonl(folder / "prompts.jsonl", rows)
    train = {
        **QUICK,
        "generation_samples": 2,
        "num_generations": 2,
        "max_completion_length": 2,
        "rewards": [{"function": "exact_match", "column": "answer"}],
    }
    path = make_lm_config(folder, models["llama"], data, train=train, output={"report": False})
    path.write_text(path.read_text().replace("causal-lm", "grpo"))
    return path


#: How to train a tiny adapter of each registered task.
BUILDERS: dict[str, Callable[[Path, dict[str, Path]], Path]] = {
    "text-classification": _text,
    "image-classification": _image,
    "causal-lm": _chat,
    "preference": _pairs,
    "token-classification": _tags,
    "grpo": _prompts,
}


def test_every_task_is_covered():
    assert set(BUILDERS) == set(task_names()), "add a builder for each registered task"


@pytest.fixture(scope="module")
def adapters(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_vit_dir: Path, tiny_llama_dir: Path
) -> dict[str, Path]:
    models = {"bert": tiny_bert_dir, "vit": tiny_vit_dir, "llama": tiny_llama_dir}
    out = {}
    for name, build in BUILDERS.items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = lorakit.train(build(folder, models), progress=False).adapter_dir
    return out


def _input_for(task: Task, adapter: Path) -> str:
    if task.try_widget == "image-labels":
        return str(next((adapter.parents[1] / "images").rglob("*.png")))
    return "what colour is the sky ?"


# ---- the contract is complete -------------------------------------------------------------------------


def _task_attributes(path: Path) -> set[tuple[str, int, str]]:
    """``(file, line, attribute)`` of every ``task.X`` / ``<obj>.task.X`` read outside ``tasks/``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        named = (isinstance(owner, ast.Name) and owner.id in ("task", "the_task")) or (
            isinstance(owner, ast.Attribute) and owner.attr == "task"
        )
        if named:
            found.add((str(path.relative_to(SRC)), node.lineno, node.attr))
    return found


def test_every_stage_asks_only_what_task_declares():
    used = set()
    for path in SRC.rglob("*.py"):
        if "tasks" not in path.relative_to(SRC).parts:
            used |= _task_attributes(path)
    assert len(used) > 30  # the reader sees the stages' calls
    undeclared = sorted(f"{f}:{line} task.{attr}" for f, line, attr in used if not hasattr(Task, attr))
    assert not undeclared, "stages call what Task does not declare:\n" + "\n".join(undeclared)


@pytest.mark.parametrize("name", sorted(task_names()))
def test_every_task_declares_its_answers(name):
    task = get_task(name)
    assert task.cli_command in ANSWERS
    assert (task.prediction_model is not None) == (task.cli_command == "predict")
    assert task.try_widget in ("text-labels", "image-labels", "text-spans", "chat")


# ---- refused in one line on every surface ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("command", ANSWERS)
def test_cli_answers_or_refuses_in_one_line(adapters, name, command, capsys):
    task = get_task(name)
    capsys.readouterr()
    args = [command, str(adapters[name]), _input_for(task, adapters[name])]
    if command == task.cli_command:
        with pytest.raises(SystemExit) as done:
            main([*args, "--json"] if command == "predict" else [*args, "--max-new-tokens", "2", "--json"])
        assert done.value.code == 0
        record = json.loads(capsys.readouterr().out.strip().splitlines()[0])
        if task.prediction_model is not None:
            task.prediction_model.model_validate(record)
        else:
            assert set(record) == {"input", "output"}
        return
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert (
        err[0]
        == f"error: lorakit {command} does not answer with {name} adapters; use lorakit {task.cli_command}"
    )


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_cli_predict_with_its_options_refuses_a_generating_adapter_in_one_line(adapters, name, capsys):
    # `lorakit predict --top-k 2` on a chat adapter once ended in KeyError: 'top_k'
    task = get_task(name)
    if task.cli_command == "predict":
        pytest.skip("answers predict")
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(adapters[name]), "hi", "--top-k", "2", "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err == [
        f"error: lorakit predict does not answer with {name} adapters; use lorakit generate"
    ]


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("command", ANSWERS)
def test_python_api_answers_or_refuses_in_one_line(adapters, name, command):
    from lorakit.errors import AdapterError
    from lorakit.serving import prediction

    task = get_task(name)
    call = getattr(prediction, command)
    inputs = [_input_for(task, adapters[name])]
    if command == task.cli_command:
        assert (
            len(call(adapters[name], inputs, **({"max_new_tokens": 2} if command == "generate" else {}))) == 1
        )
        return
    with pytest.raises(AdapterError) as exc:
        call(adapters[name], inputs)
    assert (
        str(exc.value)
        == f"lorakit {command} does not answer with {name} adapters; use lorakit {task.cli_command}"
    )


@pytest.fixture(scope="module")
def servers(adapters):
    from fastapi.testclient import TestClient

    from lorakit.serving import Engine, create_app

    engines = {name: Engine([f"a={path}"], window_ms=1) for name, path in adapters.items()}
    yield {name: TestClient(create_app(e)) for name, e in engines.items()}
    for e in engines.values():
        e.close()


REQUESTS = {
    "/v1/predict": {"adapter": "a", "inputs": ["what colour is the sky ?"]},
    "/v1/chat/completions": {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"model": "a", "prompt": "hi", "max_tokens": 2},  # served for no task
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("route", sorted(REQUESTS))
def test_http_serves_its_route_and_refuses_the_other_in_one_line(servers, adapters, name, route):
    import base64

    task, client = get_task(name), servers[name]
    ours = "/v1/predict" if task.cli_command == "predict" else "/v1/chat/completions"
    body = json.loads(json.dumps(REQUESTS[route]))
    if route == "/v1/predict" and task.try_widget == "image-labels":
        body["inputs"] = [base64.b64encode(Path(_input_for(task, adapters[name])).read_bytes()).decode()]
    r = client.post(route, json=body)
    if route == ours:
        assert r.status_code == 200, r.text
        assert route in client.get("/openapi.json").json()["paths"]
        return
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert message == f"{route} does not answer with {name} adapters; use {ours}"
    assert route not in client.get("/openapi.json").json()["paths"]


@pytest.fixture(scope="module")
def ui(adapters, tmp_path_factory):
    from fastapi.testclient import TestClient

    from lorakit.ui import create_app

    ws = tmp_path_factory.mktemp("ws")
    for name, adapter in adapters.items():
        run = ws / "runs" / name
        shutil.copytree(adapter.parent, run, ignore=shutil.ignore_patterns("checkpoint*"))
    client = TestClient(create_app(ws), base_url="http://127.0.0.1:7860")
    yield client
    client.close()


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("action", ["predict", "chat"])
def test_ui_api_answers_or_refuses_in_one_line(ui, adapters, name, action):
    import base64

    task = get_task(name)
    ours = "predict" if task.cli_command == "predict" else "chat"
    if action == "predict":
        text = _input_for(task, adapters[name])
        if task.try_widget == "image-labels":
            text = "data:image/png;base64," + base64.b64encode(Path(text).read_bytes()).decode()
        body: dict[str, Any] = {"inputs": [text], "top_k": 2}
    else:
        body = {"message": "what colour is the sky ?", "max_new_tokens": 2}
    r = ui.post(f"/api/runs/{name}/{action}", json=body)
    if action == ours:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400
    assert r.json()["error"] == (
        f"/api/runs/{name}/{action} does not answer with {name} adapters; use /api/runs/{name}/{ours}"
    )
