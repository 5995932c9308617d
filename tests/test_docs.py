"""The documentation site: it builds with no warning (a broken link, a missing page or a reference the
code no longer has fails here), its generated reference covers everything the code defines, and the
troubleshooting page names every kind of error lorakit raises."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import sys
from pathlib import Path

import pytest
import yaml

import lorakit
from lorakit.config import schema
from lorakit.errors import LorakitError
from lorakit.tasks import task_class, task_names

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lorakit"
TROUBLESHOOTING = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")

sys.path.insert(0, str(ROOT / "scripts"))
import docs_reference  # noqa: E402  (scripts/ is not a package)


@pytest.mark.slow  # mkdocstrings asks git where the sources live
def test_site_builds_strict(tmp_path, monkeypatch):
    """`make docs` in-process: mkdocs --strict, the reference pages generated from the code on the way."""
    pytest.importorskip("mkdocs", reason="the docs extra (make setup installs it)")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    monkeypatch.setenv("DISABLE_MKDOCS_2_WARNING", "true")
    build(load_config(str(ROOT / "mkdocs.yml"), strict=True, site_dir=str(tmp_path / "site")))
    site = tmp_path / "site"
    for page in ("reference/config", "reference/cli", "reference/http-api", "reference/python-api"):
        assert (site / page / "index.html").is_file(), page
    api = (site / "reference" / "python-api" / "index.html").read_text(encoding="utf-8")
    assert "resume" in api and "progress" in api  # lorakit.train's docstring, rendered by mkdocstrings


def _leaf_fields(model, prefix):
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, schema.BaseModel):
            yield from _leaf_fields(sub, f"{prefix}.{name}")
        else:
            yield f"{prefix}.{name}", field


def test_config_reference_has_every_field_of_every_task():
    page = docs_reference.config_reference()
    for name in task_names():
        task = task_class(name)
        assert f"## Task `{name}`" in page
        for section, model in (("data", task.data_config), ("train", task.train_config)):
            for key, field in _leaf_fields(model, section):
                assert f"`{key}`" in page, f"{key} ({name}) missing from the config reference"
                assert " ".join((field.description or "").split()).replace("|", "\\|") in page, key
    for section, model in (
        ("model", schema.ModelConfig),
        ("lora", schema.LoraSettings),
        ("output", schema.OutputConfig),
    ):
        for key, _ in _leaf_fields(model, section):
            assert f"`{key}`" in page, key
    # a choice field shows its allowed values, a bounded one its bounds
    row = next(line for line in page.splitlines() if line.startswith("| `data.truncation`"))
    assert "`head_tail`" in row and "`tail`" in row
    assert ">= 1" in next(line for line in page.splitlines() if line.startswith("| `lora.r`"))


def test_cli_reference_has_every_command_and_option():
    import typer

    from lorakit.cli import app

    page = docs_reference.cli_reference()
    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="lorakit")

    def walk(cmd, path, ctx):
        assert f"## `{path}`" in page, path
        for param in cmd.params:
            if param.param_type_name == "option":
                for opt in param.opts:
                    assert opt in page, f"{path} {opt}"
        for name in getattr(cmd, "list_commands", lambda _c: [])(ctx):
            sub = cmd.get_command(ctx, name)
            walk(sub, f"{path} {name}", root.context_class(sub, info_name=name, parent=ctx))

    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        walk(cmd, f"lorakit {name}", root.context_class(cmd, info_name=name, parent=ctx))


def test_http_reference_has_every_route_of_every_task():
    pytest.importorskip("fastapi")
    page = docs_reference.http_reference()
    for name in task_names():
        schema_ = docs_reference.openapi_schema(name)
        for path, methods in schema_["paths"].items():
            for method in methods:
                assert f"### {method.upper()} `{path}`" in page, (name, method, path)
        for model in schema_["components"]["schemas"]:
            assert f"#### {model} " in page, (name, model)


def _error_classes() -> set[type]:
    for info in pkgutil.walk_packages(lorakit.__path__, "lorakit."):
        if info.name.endswith("__main__"):
            continue  # it runs the command line
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional extra that is not installed
            continue
    found, todo = set(), [LorakitError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_troubleshooting_names_every_error_class():
    missing = [cls.__name__ for cls in _error_classes() if f"`{cls.__name__}`" not in TROUBLESHOOTING]
    assert not missing, f"docs/troubleshooting.md does not name {missing}"


# A message that starts with a config key or an option names what it is about; the page lists each.
PREFIX = re.compile(r"^((?:task|data|model|lora|train|output|tune)\.[a-z_.]+|--[a-z][a-z-]+):")


def _message_prefixes() -> dict[str, str]:
    def literal_start(node: ast.AST) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            return node.values[0].value
        return ""

    names = {cls.__name__ for cls in _error_classes()}
    found: dict[str, str] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
                func = node.exc.func
                if isinstance(func, ast.Name) and func.id in names:
                    match = PREFIX.match(literal_start(node.exc.args[0]))
                    if match:
                        found.setdefault(match.group(1), f"{path.relative_to(SRC)}:{node.lineno}")
    return found


def test_troubleshooting_lists_every_message_family():
    prefixes = _message_prefixes()
    assert "data.label_names" in prefixes and "--resume" in prefixes  # the scan finds what it should
    missing = {p: where for p, where in prefixes.items() if p not in TROUBLESHOOTING}
    assert not missing, f"docs/troubleshooting.md lists no message starting with {missing}"


def test_a_newcomer_finds_the_answers_from_the_navigation():
    """The issue's three questions: train on my CSV, what data.truncation does, what 'does not fit base
    model' means, each reachable from the site's navigation."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]

    def pages(entry):
        if isinstance(entry, dict):
            for title, sub in entry.items():
                yield from ((title, p) for p in [sub]) if isinstance(sub, str) else pages(sub)
        elif isinstance(entry, list):
            for e in entry:
                yield from pages(e)

    titles = dict(pages(nav))
    csv = next(page for title, page in titles.items() if "CSV" in title)
    assert "text_column" in (ROOT / "docs" / csv).read_text(encoding="utf-8")
    assert "reference/config.md" in titles.values() and "troubleshooting.md" in titles.values()
    assert "`data.truncation`" in docs_reference.config_reference()
    assert "does not fit base model" in TROUBLESHOOTING
