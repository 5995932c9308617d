"""The documentation's reference pages, generated from the code each time the site is built.

`mkdocs build` runs this file through the mkdocs-gen-files plugin (mkdocs.yml): it writes

- ``reference/config.md``: every field of every config section and of every task's own ``data:`` /
  ``train:`` fields, from the pydantic models (type, default, allowed values, description);
- ``reference/cli.md``: every ``lorakit`` command and option, from the typer app;
- ``reference/http-api.md``: the routes of ``lorakit serve`` per kind of task, from the FastAPI app's
  OpenAPI schema (the app is built around the task alone: no model is loaded).

Nothing here is copied by hand, so a new field, option or route appears on the next build. Run it
alone to print a page: ``python scripts/docs_reference.py config|cli|http``.
"""

from __future__ import annotations

import enum
import json
import sys
import types
import typing
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

# ---------------------------------------------------------------------------------------------------
# Config fields
# ---------------------------------------------------------------------------------------------------


def type_name(annotation: Any) -> str:
    """A short readable type: ``int``, ``list[str] | null``, ``float in (0, 1)`` is left to bounds."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return "choice"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.__name__
    return getattr(annotation, "__name__", str(annotation))


def allowed_values(field: FieldInfo) -> str:
    """The Literal choices and numeric / length bounds of a field, as text."""
    parts: list[str] = []
    for arg in _flat_args(field.annotation):
        if typing.get_origin(arg) is typing.Literal:
            parts.append(", ".join(f"`{v}`" for v in typing.get_args(arg)))
    symbols = {
        annotated_types.Ge: ">=",
        annotated_types.Gt: ">",
        annotated_types.Le: "<=",
        annotated_types.Lt: "<",
    }
    for meta in field.metadata:
        for kind, symbol in symbols.items():
            if isinstance(meta, kind):
                parts.append(f"{symbol} {getattr(meta, kind.__name__.lower())}")
        if isinstance(meta, annotated_types.MinLen):
            parts.append(f"at least {meta.min_length} item(s)")
    return "; ".join(parts)


def _flat_args(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _flat_args(arg)]
    return [annotation]


def default_text(field: FieldInfo) -> str:
    """The default as YAML would spell it; ``required`` when there is none."""
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(see below)"
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{json.dumps(value, default=str)}`".replace("true", "true")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def field_table(model: type[BaseModel], prefix: str, only: set[str] | None = None) -> list[str]:
    """A markdown table of ``model``'s fields (``only`` those names when given), nested sections after."""
    rows = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((f"{prefix}.{name}", annotation))
        for item in typing.get_args(annotation) if typing.get_origin(annotation) is list else ():
            if isinstance(item, type) and issubclass(item, BaseModel):
                nested.append((f"{prefix}.{name}[]", item))  # each entry of a list of mappings
        rows.append(
            f"| `{prefix}.{name}` | {_cell(type_name(annotation))} | {_cell(default_text(field))} "
            f"| {_cell(allowed_values(field))} | {_cell(field.description or '')} |"
        )
    lines = rows
    for key, sub in nested:
        lines += ["", f"`{key}`: {_cell(sub.__doc__ or '')}", "", *field_table(sub, key)]
    return lines


def _differs(task_model: type[BaseModel], base: type[BaseModel]) -> set[str]:
    """The fields a task adds to a section, or whose default or description it changes."""
    out = set()
    for name, field in task_model.model_fields.items():
        mine = base.model_fields.get(name)
        if (
            mine is None
            or default_text(mine) != default_text(field)
            or mine.description != field.description
            or mine.annotation != field.annotation
        ):
            out.add(name)
    return out


def config_reference() -> str:
    """Every config section and every task's own fields."""
    from lorakit.config import schema
    from lorakit.experiments.tuning import SearchDim, TuneConfig
    from lorakit.tasks import task_class, task_names

    out = [
        "# Configuration reference",
        "",
        "Generated from the pydantic models of `lorakit.config.schema` and of each task when this site "
        "was built. A run config is one YAML file with the sections below; unknown keys are errors, and "
        "every problem is reported at once. Any key can be overridden on the command line with "
        "`--set section.key=value`.",
        "",
        f"`task` (default `{schema.DEFAULT_TASK}`) is one of: "
        + ", ".join(f"[`{n}`](#task-{n})" for n in task_names())
        + ". Each task owns part of the `data:` and `train:` sections: the fields every task has are "
        "listed first, then what each task adds or changes.",
        "",
    ]
    sections = [
        ("data", schema.DataConfig, ""),
        ("model", schema.ModelConfig, ""),
        ("lora", schema.LoraSettings, ""),
        ("train", schema.TrainConfig, ""),
        ("output", schema.OutputConfig, ""),
    ]
    for key, model, note in sections:
        out += [f"## `{key}:`", "", _cell(model.__doc__ or "") + (f" ({note})" if note else ""), ""]
        out += [*field_table(model, key), ""]
    for name in task_names():
        task = task_class(name)
        out += [f"## Task `{name}` {{#task-{name}}}", "", _cell(task.__doc__ or ""), ""]
        for key, own, base in (
            ("data", task.data_config, schema.DataConfig),
            ("train", task.train_config, schema.TrainConfig),
        ):
            names = _differs(own, base)
            if names:
                out += [f"`{key}:` fields of this task:", "", *field_table(own, key, names), ""]
    out += ["## `tune:`", "", _cell(TuneConfig.__doc__ or ""), "", *field_table(TuneConfig, "tune"), ""]
    out += [
        "Each entry of `tune.space` (a config key such as `lora.r`) is:",
        "",
        *field_table(SearchDim, "tune.space.KEY"),
        "",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def _param_row(param: Any, ctx: Any) -> str:
    """One row: the option as `--help` declares it, and its help with default, range and variable."""
    if param.param_type_name == "argument":
        name = f"`{param.name.upper()}` {_cell(param.display_type(ctx))}"
        kind = "argument" + (", repeatable" if param.nargs == -1 else "")
        extra = [] if param.required else ["optional"]
        help_text = " ".join([param.help or "", *extra])
        return f"| {name} | {kind} | {_cell(help_text)} |"
    decl, help_text = param.get_help_record(ctx)
    kind = (
        ("flag" if getattr(param, "is_flag", False) else "option")
        + (", repeatable" if param.multiple else "")
        + (", required" if param.required else "")
    )
    return f"| `{_cell(decl)}` | {kind} | {_cell(help_text)} |"


def _command_lines(cmd: Any, path: str, ctx: Any) -> list[str]:
    lines = [f"## `{path}`", "", _cell(cmd.help or ""), ""]
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    lines += ["```", f"{path} {usage}", "```", ""]
    params = [p for p in cmd.params if not getattr(p, "hidden", False)]
    if params:
        lines += ["| name | kind | help |", "|---|---|---|"]
        lines += [_param_row(p, ctx) for p in params] + [""]
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            lines += _command_lines(sub, f"{path} {name}", type(ctx)(sub, info_name=name, parent=ctx))
    return lines


def cli_reference() -> str:
    """Every command of ``lorakit`` and its arguments and options."""
    import typer

    from lorakit.cli import app

    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="lorakit")
    out = [
        "# Command-line reference",
        "",
        "Generated from the `lorakit` command (typer) when this site was built; `lorakit COMMAND --help` "
        "prints the same. Every user mistake ends in one line `error: ...` and exit code 2 "
        "([troubleshooting](../troubleshooting.md)).",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        out.append(f"| [`lorakit {name}`](#lorakit-{name}) | {_cell(cmd.help or '')} |")
    out.append("")
    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        out += _command_lines(cmd, f"lorakit {name}", root.context_class(cmd, info_name=name, parent=ctx))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# HTTP API
# ---------------------------------------------------------------------------------------------------


def openapi_schema(task_name: str) -> dict[str, Any]:
    """The OpenAPI schema ``lorakit serve`` publishes for adapters of ``task_name``.

    The app factory reads only the engine's task while it builds the routes (requests reach the engine
    later), so the schema comes from the real app around the task alone, without loading a model.
    """
    from lorakit.serving.app import create_app
    from lorakit.tasks import get_task

    return create_app(types.SimpleNamespace(task=get_task(task_name)), admin_token="docs").openapi()


def _schema_type(schema: dict[str, Any], anchors: dict[str, str]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{anchors[name]})"
    if "anyOf" in schema:
        return " or ".join(_schema_type(s, anchors) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_schema_type(schema.get('items', {}), anchors)}"
    if "enum" in schema:
        return "one of " + ", ".join(f"`{v}`" for v in schema["enum"])
    return schema.get("type", "any")


_BOUNDS = (
    ("minimum", ">="),
    ("maximum", "<="),
    ("exclusiveMinimum", ">"),
    ("exclusiveMaximum", "<"),
    ("minLength", "min length"),
    ("maxLength", "max length"),
    ("minItems", "min items"),
    ("maxItems", "max items"),
)


def _model_lines(name: str, schema: dict[str, Any], anchors: dict[str, str]) -> list[str]:
    lines = [f"#### {name} {{#{anchors[name]}}}", "", _cell(schema.get("description", "")), ""]
    props = schema.get("properties", {})
    if props:
        required = set(schema.get("required", []))
        lines += ["| field | type | required | default | description |", "|---|---|---|---|---|"]
        for key, prop in props.items():
            default = f"`{json.dumps(prop['default'])}`" if "default" in prop else ""
            bounds = [f"{word} {prop[k]}" for k, word in _BOUNDS if k in prop]
            desc = prop.get("description", "") + (f" ({', '.join(bounds)})" if bounds else "")
            lines.append(
                f"| `{key}` | {_schema_type(prop, anchors)} | {'yes' if key in required else ''} "
                f"| {_cell(default)} | {_cell(desc)} |"
            )
        lines.append("")
    return lines


def _route_lines(path: str, method: str, op: dict[str, Any], anchors: dict[str, str]) -> list[str]:
    lines = [f"### {method.upper()} `{path}`", "", _cell(op.get("summary", "")), ""]
    if op.get("description"):
        lines += [_cell(op["description"]), ""]
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
    if body:
        lines += [f"Request body: {_schema_type(body.get('schema', {}), anchors)}.", ""]
    answers = []
    for code, response in op.get("responses", {}).items():
        content = response.get("content", {}).get("application/json", {}).get("schema", {})
        shape = f" ({_schema_type(content, anchors)})" if "$ref" in content else ""
        answers.append(f"`{code}` {_cell(response.get('description', ''))}{shape}")
    return [*lines, "Responses: " + "; ".join(answers) + ".", ""]


def http_reference() -> str:
    """The routes and models of ``lorakit serve``: those every server has, then each task's own."""
    from lorakit.tasks import task_names

    schemas = {name: openapi_schema(name) for name in task_names()}
    routes = {
        name: {(path, method): op for path, ops in s["paths"].items() for method, op in ops.items()}
        for name, s in schemas.items()
    }
    models = {name: s.get("components", {}).get("schemas", {}) for name, s in schemas.items()}
    first = task_names()[0]
    common_routes = [k for k in routes[first] if all(routes[t].get(k) == routes[first][k] for t in routes)]
    common_models = [m for m in models[first] if all(models[t].get(m) == models[first][m] for t in models)]
    out = [
        "# HTTP API reference",
        "",
        "Generated from the OpenAPI schema of `lorakit serve` when this site was built. A running "
        "server publishes the same schema at `/openapi.json` and an interactive page at `/docs`. "
        "A server serves adapters of one task and base model: a task whose adapters classify or tag "
        "answers `POST /v1/predict`, a language-model task answers `POST /v1/chat/completions` (the "
        "other route answers 404 naming the right one). Every error is JSON "
        '`{"error": {"type": ..., "message": ...}}` with a 4xx status. See '
        "[serving and its security](../guides/serving.md).",
        "",
        "## Routes every server has",
        "",
    ]
    anchors = {m: f"model-{m.lower()}" for m in common_models}
    for path, method in common_routes:
        out += _route_lines(path, method, routes[first][(path, method)], anchors)
    out += ["### Models every server has", ""]
    for m in common_models:
        out += _model_lines(m, models[first][m], anchors)
    for name in task_names():
        own = {**anchors, **{m: f"{name}-{m.lower()}" for m in models[name] if m not in common_models}}
        out += [f"## Adapters of task `{name}`", ""]
        for (path, method), op in routes[name].items():
            if (path, method) not in common_routes:
                out += _route_lines(path, method, op, own)
        for m, schema in models[name].items():
            if m not in common_models:
                out += _model_lines(m, schema, own)
    return "\n".join(out)


PAGES = {"config": config_reference, "cli": cli_reference, "http": http_reference}
FILES = {"config": "reference/config.md", "cli": "reference/cli.md", "http": "reference/http-api.md"}

if __name__ == "__main__":
    print(PAGES[sys.argv[1]]())
else:  # run by mkdocs-gen-files during `mkdocs build`
    import mkdocs_gen_files

    for key, path in FILES.items():
        with mkdocs_gen_files.open(path, "w") as f:
            f.write(PAGES[key]())
