"""The package's shape, read from its own source: the layering of its folders, no import cycle, short
functions. Nothing is imported or run: the files are parsed with ``ast``.

The layers, bottom to top (a module may import its own package and the layers below it, never above):

==  =========================================================  ==========================================
 0  ``errors``                                                 exception types
 1  ``files``, ``runtime``, ``tasks`` (the registry only)      disk, process; task names -> "module:Class"
 2  ``config``                                                 the sections, loading, validation
 3  ``data``                                                   reading, splitting, images, labels, batches
 4  ``models``                                                 base models, LoRA, the zoo
 5  ``tasks.*``                                                the tasks (the one extension point)
 6  ``adapters``                                               the adapter folder: write, read, build, card,
                                                               import, registry, Hub
 7  ``evaluation``                                             scoring and the report
 8  ``training``                                               the recipe, checkpoints, trackers, check
 9  ``experiments``, ``export``                                search; merge, ONNX, GGUF, vLLM
10  ``serving``                                                predict, the engine, the HTTP app
11  ``ui``                                                     the web app
12  ``cli``, ``lorakit`` (the public API), ``__main__``        entry points
==  =========================================================  ==========================================
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "lorakit"

LAYER_OF_PACKAGE = {
    "lorakit.errors": 0,
    "lorakit.files": 1,
    "lorakit.runtime": 1,
    "lorakit.config": 2,
    "lorakit.data": 3,
    "lorakit.models": 4,
    "lorakit.tasks": 5,
    "lorakit.adapters": 6,
    "lorakit.evaluation": 7,
    "lorakit.training": 8,
    "lorakit.experiments": 9,
    "lorakit.export": 9,
    "lorakit.serving": 10,
    "lorakit.ui": 11,
    "lorakit.cli": 12,
    "lorakit.__main__": 12,
    "lorakit": 12,
}
REGISTRY_MODULE = "lorakit.tasks"  # the registry itself is a leaf (layer 1): it imports tasks by name only
MAX_LOGIC_LINES = 60  # per function: statements, not its docstring, signature, comments or blank lines


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def layer(module: str) -> int:
    if module == REGISTRY_MODULE:
        return 1
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYER_OF_PACKAGE:
            return LAYER_OF_PACKAGE[prefix]
    raise AssertionError(f"{module} is in no layer: add its folder to LAYER_OF_PACKAGE")


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name | ast.Attribute) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(path: Path) -> set[str]:
    """Every lorakit module that ``path`` imports, at its top or inside a function (lazy imports are
    dependencies too), except under ``if TYPE_CHECKING:`` (annotations only)."""
    found: set[str] = set()
    known = modules()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lorakit"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorakit"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


@cache
def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules(path) - {name} for name, path in modules().items()}


def test_every_import_goes_down_the_layers_or_stays_in_its_package():
    wrong = []
    for module, targets in sorted(import_graph().items()):
        own = module.rsplit(".", 1)[0] if modules()[module].name != "__init__.py" else module
        for target in sorted(targets):
            same_package = target == own or target.startswith(own + ".")
            if layer(target) > layer(module) or (layer(target) == layer(module) and not same_package):
                wrong.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_there_is_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_task_registry_imports_no_task_code():
    assert import_graph()[REGISTRY_MODULE] <= {"lorakit.errors"}


@pytest.mark.parametrize(
    "package", sorted(m for m, p in modules().items() if p.name == "__init__.py" and m != "lorakit")
)
def test_every_package_says_what_it_holds_and_what_it_may_import(package):
    doc = ast.get_docstring(ast.parse(modules()[package].read_text(encoding="utf-8"))) or ""
    assert doc and "May import" in doc, f"{package}/__init__.py needs a docstring ending in 'May import: ...'"


def _logic_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    if not body:
        return 0
    text = lines[body[0].lineno - 1 : node.end_lineno]
    return sum(1 for line in text if line.strip() and not line.strip().startswith("#"))


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(modules().values()):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = _logic_lines(node, lines)
                if n > MAX_LOGIC_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"functions over {MAX_LOGIC_LINES} lines of logic:\n" + "\n".join(long)


def test_the_checks_see_what_they_should():
    # The readers above would pass on an empty graph; this pins that they read real imports.
    graph = import_graph()
    assert "lorakit.config.schema" in graph["lorakit.tasks.base"]
    assert "lorakit.tasks" in graph["lorakit.config.loading"]
    assert len(graph) > 60
