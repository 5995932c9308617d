"""What "Validate" checks beyond the schema, before anything starts: the cheap parts of ``lorakit check``.

The schema says a config is well formed; "Start" also needs the base model to be there, each data
source to be readable with the columns the task reads, and the run name to be free. Each of those
is checked here the way the run itself will do it (:func:`lorakit.files.paths.resolve_location`,
``task.read_data`` and ``task.columns``), so a problem found here is the one the run would stop on.
Hub names are not fetched: the run downloads them (``lorakit check`` behind "Check" tries that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.config.schema import RunConfig
from lorakit.data.sources import filter_rows, require_columns
from lorakit.errors import LorakitError
from lorakit.files.paths import looks_like_local_path, resolve_location
from lorakit.tasks import get_task
from lorakit.ui.workspace import Workspace, read_json

SOURCES = ("train", "validation", "test")
PREVIEW_ROWS = 5


def name_taken(ws: Workspace, name: str) -> str | None:
    """The problem with starting a run called ``name`` when one exists (a folder, queued or started)."""
    run = ws.run_dir(name)
    if (run.exists() and any(run.iterdir())) or read_json(ws.state_file(name, ".json")) is not None:
        return (
            f"run name '{name}': a run of that name exists already (see /runs/{name}); choose another "
            "name, or delete that run first"
        )
    return None


def model_problem(cfg: RunConfig) -> str | None:
    """Why the base model cannot be opened (a ``pkg://`` package not installed, a missing folder)."""
    location = cfg.model.name_or_path
    try:
        resolved = resolve_location(location, what="model.name_or_path")
    except Exception as exc:  # lorakit's own errors, and whatever else a strange location raises
        return _one_line("model.name_or_path", location, exc)
    if looks_like_local_path(location) and not Path(resolved).expanduser().exists():
        return (
            f"model.name_or_path: '{location}' does not exist; check the path (it is read from the workspace)"
        )
    return None


def _read(cfg: RunConfig, key: str) -> Any:
    """The rows of source ``data.<key>`` as the run reads them, or None for a Hub name (not fetched)."""
    location = getattr(cfg.data, key)
    if not location:
        return None
    try:
        local = looks_like_local_path(resolve_location(location, what=f"data.{key}"))
    except Exception:
        local = True  # read_data reports it as the run would
    if not local and cfg.data.format in ("auto", "hub"):
        return None
    task = get_task(cfg.task)
    ds = filter_rows(task.read_data(location, cfg.data, key=f"data.{key}"), cfg.data.where, key=f"data.{key}")
    require_columns(ds, task.columns(cfg.data), key=f"data.{key}")
    return ds


def data_problems(cfg: RunConfig) -> dict[str, str]:
    """Per ``data.<source>`` key: why it cannot be read or lacks a column the task reads."""
    problems = {}
    for key in SOURCES:
        try:
            _read(cfg, key)
        except Exception as exc:  # lorakit's own errors, and whatever else a strange location raises
            problems[f"data.{key}"] = _one_line(f"data.{key}", getattr(cfg.data, key), exc)
    return problems


def _one_line(key: str, location: str, exc: Exception) -> str:
    """An exception as the one line the form shows (lorakit's messages already name the key)."""
    if isinstance(exc, LorakitError):
        return " ".join(str(exc).split())
    return f"{key}: '{location}' cannot be used: {' '.join(str(exc).split())[:200] or type(exc).__name__}"


def start_problems(ws: Workspace, cfg: RunConfig, name: str) -> dict[str, str]:
    """Every problem "Start" would run into, by the form key it belongs to (``run_name`` for the name)."""
    problems = data_problems(cfg)
    if (model := model_problem(cfg)) is not None:
        problems["model.name_or_path"] = model
    if name and (taken := name_taken(ws, name)) is not None:
        problems["run_name"] = taken
    return problems


def _held_out(size: float, n: int) -> int:
    return int(size) if size >= 1 else max(1, round(size * n))


def preview(cfg: RunConfig) -> dict[str, Any] | None:
    """The training data as the run will see it: first rows, label counts, what is held out.

    Returns:
        ``{"columns", "rows", "total", "labels": {label: count} | None, "split": {train, validation,
        test}}``, or None when ``data.train`` is a Hub name (not fetched here).

    Raises:
        LorakitError: The data cannot be read or lacks a column (the message names the key).
    """
    try:
        ds = _read(cfg, "train")
    except LorakitError:
        raise
    except Exception as exc:
        raise LorakitError(_one_line("data.train", cfg.data.train, exc)) from None
    if ds is None:
        return None
    d, n = cfg.data, len(ds)
    test = 0 if d.test else (_held_out(d.test_size, n) if d.test_size > 0 else 0)
    validation = 0 if d.validation else _held_out(d.validation_size, n - test)
    train = n - test - validation
    train = min(train, d.max_train_samples) if d.max_train_samples else train
    label_column = getattr(d, "label_column", None)
    labels = None
    if label_column in ds.column_names:
        counts: dict[str, int] = {}
        for v in ds[label_column]:
            counts[str(v)] = counts.get(str(v), 0) + 1
        labels = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    head = ds.select(range(min(PREVIEW_ROWS, n)))
    rows = [[_cell(row[c]) for c in ds.column_names] for row in head]
    return {
        "columns": ds.column_names,
        "rows": rows,
        "total": n,
        "labels": labels,
        "split": {
            "train": train,
            "validation": "from data.validation" if d.validation else validation,
            "test": "from data.test" if d.test else test,
        },
    }


def _cell(value: Any) -> str:
    text = str(value) if not hasattr(value, "size") else f"image {getattr(value, 'size', '')}"
    return text if len(text) <= 160 else text[:157] + "..."
