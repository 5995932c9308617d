"""The new-run form, generated from the config's pydantic models: one section per model, one input
per field, with the field's description, default and allowed values. Nothing is written twice:
adding a field to :mod:`lorakit.config.schema` adds it to the form.

Form values come back as strings; :func:`form_to_config` turns them into the plain data a YAML
file would hold and :func:`validate` runs the CLI's validator on it, each problem placed beside
the field it names.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lorakit.config.loading import run_config_class, validate_config
from lorakit.config.schema import RunConfig, load_yaml
from lorakit.errors import ConfigError
from lorakit.files.paths import PKG_SCHEME

#: Set by the UI from the run name, not typed in.
HIDDEN = {"output.dir", "output.overwrite"}
#: Shown first, outside "advanced": what a new user sets (with every ``data.*_column`` of the task).
ESSENTIAL = ("data.train", "model.name_or_path", "train.epochs", "train.learning_rate", "lora.r")
#: Fields naming files the run reads: local ones must lie inside the workspace (pkg:// and Hub names pass).
PATH_KEYS = ("data.train", "data.validation", "data.test", "model.name_or_path")


def section_models(task: str) -> dict[str, type[BaseModel]]:
    """The model class of each config section for ``task`` (its own ``data`` / ``train`` classes).

    Raises:
        ConfigError: No such task.
    """
    return {
        name: f.annotation
        for name, f in run_config_class(task).model_fields.items()
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
    }


@dataclass
class FormField:
    """One input of the form."""

    key: str  # dotted path, e.g. "train.epochs"
    label: str
    description: str
    kind: str  # select / bool / text / yaml
    default: Any
    options: list[str] = field(default_factory=list)
    required: bool = False
    value: str = ""  # as shown in the input
    errors: list[str] = field(default_factory=list)
    essential: bool = False  # shown first; the others sit under the section's "advanced"


@dataclass
class Section:
    name: str
    description: str
    fields: list[FormField]
    subsections: list[Section] = field(default_factory=list)

    @property
    def essential(self) -> list[FormField]:
        return [f for f in self.fields if f.essential]

    @property
    def advanced(self) -> list[FormField]:
        return [f for f in self.fields if not f.essential]

    @property
    def has_errors(self) -> bool:
        """A problem in this section or below it (its "advanced" part opens then)."""
        return any(f.errors for f in self.fields) or any(s.has_errors for s in self.subsections)


def _literal_options(annotation: Any) -> list[str] | None:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:  # Literal[...] | None
        return ["", *(str(a) for a in typing.get_args(args[0]))]
    return None


def _kind(annotation: Any) -> str:
    if annotation is bool:
        return "bool"
    if _literal_options(annotation) is not None:
        return "select"
    origin = typing.get_origin(annotation)
    args = set(typing.get_args(annotation)) - {type(None)}
    if annotation is str or (origin in (typing.Union, types.UnionType) and args == {str}):
        return "text"
    if annotation in (int, float) or (origin in (typing.Union, types.UnionType) and args <= {int, float}):
        return "number"
    return "yaml"  # lists, tuples, dicts, unions: typed as YAML (e.g. [query, value])


def show(value: Any, kind: str) -> str:
    """A config value as the form shows it."""
    if value is None:
        return ""
    if kind == "bool":
        return "true" if value else "false"
    if kind == "yaml":
        value = json.loads(json.dumps(value))  # tuples as lists: YAML's safe dumper knows no tuples
        return (
            yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
        )
    return str(value)


def build_sections(task: str, values: dict[str, Any] | None = None) -> list[Section]:
    """The form's sections for ``task``, filled with ``values`` (a config as plain data) or defaults."""
    values = values or {}
    return [
        _section(name, model, values.get(name) if isinstance(values.get(name), dict) else {}, name)
        for name, model in section_models(task).items()
    ]


def _section(name: str, model: type[BaseModel], values: dict[str, Any], prefix: str) -> Section:
    sec = Section(name=name, description=(model.__doc__ or "").strip().splitlines()[0], fields=[])
    for fname, info in model.model_fields.items():
        key = f"{prefix}.{fname}"
        if key in HIDDEN:
            continue
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            sub = values.get(fname) if isinstance(values.get(fname), dict) else {}
            sec.subsections.append(_section(fname, ann, sub, key))
            continue
        default = (
            info.get_default(call_default_factory=True)
            if info.default is not PydanticUndefined or info.default_factory
            else None
        )
        kind = _kind(ann)
        current = values.get(fname, default)
        sec.fields.append(
            FormField(
                key=key,
                label=fname,
                description=info.description or "",
                kind="select" if kind == "bool" else kind,
                default=default,
                options=["true", "false"] if kind == "bool" else (_literal_options(ann) or []),
                required=info.is_required(),
                value=show(current, kind),
                essential=_essential(key, default),
            )
        )
    return sec


def _essential(key: str, default: Any) -> bool:
    column = key.startswith("data.") and key.count(".") == 1 and key.endswith("_column")
    return key in ESSENTIAL or (column and default is not None)


def iter_fields(sections: list[Section]) -> typing.Iterator[FormField]:
    for s in sections:
        yield from s.fields
        yield from iter_fields(s.subsections)


def form_to_config(task: str, form: dict[str, str]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The config (plain data) the form's values describe, and per-field parse problems.

    Empty inputs are left out (the field's default applies); a text field keeps its string as typed;
    other values are read as YAML (``1e-3``, ``[query, value]``, ``null``).
    """
    raw: dict[str, Any] = {"task": task}
    problems: dict[str, list[str]] = {}
    for f in iter_fields(build_sections(task)):
        text = form.get(f.key, "")
        if not text.strip():
            continue
        if f.kind == "text":
            value: Any = text
        else:
            try:
                value = load_yaml(text)
            except yaml.YAMLError:
                problems.setdefault(f.key, []).append(
                    f"{f.key}: '{text[:60]}' is not a value (YAML), e.g. {show(f.default, f.kind) or 'null'}"
                )
                continue
        node = raw
        *parents, last = f.key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return raw, problems


def validate(task: str, raw: dict[str, Any], sections: list[Section]) -> tuple[RunConfig | None, list[str]]:
    """Validate ``raw`` with the CLI's validator; attach each problem to the field it names.

    Returns:
        The config when valid, and the problems no field claimed (shown at the top of the form).
    """
    try:
        return validate_config(raw, "the form"), []
    except ConfigError as exc:
        problems = exc.problems
    fields = sorted(iter_fields(sections), key=lambda f: -len(f.key))  # data.augment.x before data.a
    unplaced = []
    for p in problems:
        target = next(
            (
                f
                for f in fields
                if p.startswith(f.key) and p[len(f.key) : len(f.key) + 1] in (" ", ":", "=", ".", "[")
            ),
            None,
        )
        if target is None:
            unplaced.append(p)
        else:
            target.errors.append(p)
    return None, unplaced


def paths_outside(raw: dict[str, Any], root: Path) -> dict[str, str]:
    """Problems of the :data:`PATH_KEYS` values that name local files outside ``root``.

    Relative paths are read from ``root`` (where the UI runs ``lorakit train``), so they are
    resolved from there; ``pkg://`` paths and Hub names are not local files.
    """
    problems = {}
    for key in PATH_KEYS:
        section, _, name = key.partition(".")
        value = (raw.get(section) or {}).get(name) if isinstance(raw.get(section), dict) else None
        if not isinstance(value, str) or value.startswith(PKG_SCHEME):
            continue
        target = (root / Path(value).expanduser()).resolve()
        local = value.startswith((".", "/", "~")) or Path(value).suffix != "" or target.exists()
        if not local:  # a Hub name
            continue
        if target != root and root not in target.parents:
            problems[key] = (
                f"{key}: '{value}' is outside the workspace {root}; copy or link it into the "
                "workspace (or use a pkg:// path or a Hub name)"
            )
    return problems
