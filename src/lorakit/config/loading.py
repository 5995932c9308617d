"""Loading a run config: YAML + ``--set`` overrides -> the task's RunConfig, every problem at once.

:func:`load_config` reads the YAML, applies ``--set section.key=value`` overrides and validates
everything at once: every problem (unknown key with a "did you mean", wrong type, out-of-range value,
inconsistent pair, a key of another task) is collected into a single :class:`~lorakit.errors.ConfigError`.
The task's own ``data`` / ``train`` classes come from the task registry by name.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model

from lorakit.config.schema import DEFAULT_TASK, RunConfig, load_yaml
from lorakit.errors import ConfigError
from lorakit.tasks import task_class, task_names


@functools.cache
def run_config_class(task: str) -> type[RunConfig]:
    """The RunConfig of ``task``: its ``data`` and ``train`` sections are the task's own classes.

    Raises:
        ConfigError: No task of that name.
    """
    if task not in task_names():
        names = [repr(n) for n in task_names()]
        raise ConfigError(
            [
                f"task = {task!r}: input should be {', '.join(names[:-1])} or {names[-1]} (the "
                "tasks in lorakit/tasks)"
            ]
        )
    cls = task_class(task)
    return create_model(  # a subclass, so isinstance(cfg, RunConfig) holds for every task
        f"{cls.__name__}RunConfig",
        __base__=RunConfig,
        __doc__=f"A {task} run.",
        task=(Literal[task], Field(task, description=RunConfig.model_fields["task"].description)),  # type: ignore[valid-type]
        data=(cls.data_config, Field(description=cls.data_config.__doc__)),
        train=(
            cls.train_config,
            Field(default_factory=cls.train_config, description=cls.train_config.__doc__),
        ),
    )


# --------------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> RunConfig, every problem reported at once
# --------------------------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a YAML-parsed value.

    Raises:
        ConfigError: The item has no ``=`` or an empty key.
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"--set '{item}': expected section.key=value, e.g. --set train.epochs=2"])
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``section.key=value`` override set (creating sections)."""
    out = _deep_copy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _field_names(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """Names of the fields valid at ``path`` (the parent of an unknown key)."""
    current: Any = model
    for part in path:
        field = getattr(current, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            return []
        current = field.annotation
    return list(getattr(current, "model_fields", {}))


def _owner_hint(task: str, loc: tuple[Any, ...]) -> str | None:
    """For a key unknown to ``task``'s section: the other tasks whose section has it."""
    owners = [
        name
        for name in task_names()
        if name != task and str(loc[-1]) in _field_names(run_config_class(name), loc[:-1])
    ]
    return f"it belongs to task {' / '.join(owners)}, not {task}" if owners else None


def _format_error(err: dict[str, Any], cls: type[RunConfig]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    etype = err["type"]
    if etype == "extra_forbidden":
        allowed = _field_names(cls, loc[:-1])
        owner = (
            _owner_hint(cls.model_fields["task"].default, loc)
            if len(loc) == 2 and cls is not RunConfig
            else None
        )
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = owner or (f"did you mean '{close[0]}'?" if close else "allowed: " + ", ".join(allowed))
        return f"{key}: unknown key; {hint}"
    if etype == "missing":
        return f"{key}: required but missing"
    if etype == "finite_number":
        return f"{key} = {err.get('input')!r}: must be a finite number, not nan or infinity"
    if etype == "value_error":
        # Messages of our own validators already name the key and the fix.
        return str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return f"{key} = {shown}: {err['msg'].lower()}"


def validate_config(raw: Any, source: str | None = None) -> RunConfig:
    """Validate plain data (as read from YAML) into the :class:`RunConfig` of its task.

    Raises:
        ConfigError: With every problem found, each naming the key, the bad value and what is allowed.
    """
    if not isinstance(raw, dict):
        raise ConfigError(
            ["the file must be a YAML mapping with sections data, model, lora, train, output"], source
        )
    task = raw.get("task", DEFAULT_TASK)
    try:
        cls = run_config_class(task if isinstance(task, str) else repr(task))
    except ConfigError as exc:  # the task is unknown: its sections cannot be checked, the common ones can
        raise ConfigError(exc.problems + _common_problems(raw), source) from None
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        problems = [_format_error(e, cls) for e in exc.errors()]
        raise ConfigError(problems, source) from None


def _common_problems(raw: dict[str, Any]) -> list[str]:
    """Problems in the sections every task shares (model, lora, output)."""
    try:
        RunConfig.model_validate(raw)
    except ValidationError as exc:
        return [
            _format_error(e, RunConfig)
            for e in exc.errors()
            if e["loc"][:1] in (("model",), ("lora",), ("output",))
        ]
    return []


def saved_config(raw: dict[str, Any]) -> RunConfig:
    """A config saved with a run or adapter, read back leniently: keys its task no longer has (configs
    written before each task owned its sections kept every task's keys) are dropped, not refused.

    Raises:
        ConfigError: The saved config is not valid for its task.
    """
    cls = run_config_class(raw.get("task", DEFAULT_TASK))
    kept = {k: v for k, v in raw.items() if k in cls.model_fields}
    for section, value in kept.items():
        fields = _field_names(cls, (section,))
        if isinstance(value, dict) and fields:
            kept[section] = {k: v for k, v in value.items() if k in fields}
    return validate_config(kept)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``section.key=value`` overrides and validate it.

    Args:
        path: The YAML file.
        overrides: Items like ``"train.epochs=2"``; values are parsed as YAML.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: The file is missing, not YAML, or has one or more invalid settings (all listed).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            [f"config file '{path}' does not exist; pass the path of a YAML file (see configs/)"]
        )
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise ConfigError([f"not valid YAML{at}: {getattr(exc, 'problem', exc)}"], str(path)) from None
    if overrides:
        if not isinstance(raw, dict):
            raw = {}
        raw = apply_overrides(raw, overrides)
    return validate_config(raw, str(path))
