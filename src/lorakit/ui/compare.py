"""Two or more runs side by side: the config keys that differ, their metrics, their curves, and which
is better on the same test examples (:mod:`lorakit.evaluation.paired`)."""

from __future__ import annotations

from typing import Any

from lorakit.errors import LorakitError
from lorakit.evaluation import paired
from lorakit.evaluation.paired import Comparison
from lorakit.tasks import get_task, task_names
from lorakit.ui.progress import read_progress
from lorakit.ui.workspace import RunInfo, Workspace, read_run


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"epochs": 1}}`` -> ``{"train.epochs": 1}`` (lists stay values)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def compare_runs(ws: Workspace, names: list[str]) -> dict[str, Any]:
    """What the compare page shows for runs ``names``.

    Returns:
        ``{"names", "differences": [(key, [value per run])], "metrics": [(label, [value per run])],
        "curves": {run: {"train": [[step, loss]], "validation": [[step, metric]]}}, "metric": name}``
    """
    runs = [read_run(ws, n) for n in names]
    configs = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*configs) - {"output.dir"})
    differences = [
        (k, [c.get(k) for c in configs]) for k in keys if len({repr(c.get(k)) for c in configs}) > 1
    ]
    metric = next((r.best_metric for r in runs if r.best_metric), "") or _default_metric(runs[0].task)
    rows: list[tuple[str, list[Any]]] = [
        ("status", [r.status for r in runs]),
        ("duration", [r.duration_text for r in runs]),
    ]
    scalar_keys: list[tuple[str, str]] = []
    for r in runs:
        for split in ("validation", "test"):
            m = (r.metrics or {}).get(split) or {}
            scalar_keys += [
                (split, k) for k, v in m.items() if isinstance(v, float) and (split, k) not in scalar_keys
            ]
    for split, k in scalar_keys:
        rows.append(
            (
                f"{split} {k}" + (" (best)" if split == "validation" else ""),
                [((r.metrics or {}).get(split) or {}).get(k) for r in runs],
            )
        )
    curves = {}
    for r in runs:
        p = read_progress(r.path)
        curves[r.name] = {
            "train": p["train"],
            "validation": [[row["step"], row[metric]] for row in p["validation"] if metric in row],
        }
    return {
        "names": names,
        "differences": differences,
        "metrics": rows,
        "curves": curves,
        "metric": metric,
        "paired": _paired(runs),
    }


def _paired(runs: list[RunInfo]) -> list[Comparison | str]:
    """The first run against each other one (and each against its base model, once), example by
    example; a line instead where a run has not finished."""
    out: list[Comparison | str] = []
    seen: set[tuple[str, str]] = set()
    for other in runs[1:]:
        try:
            found = paired.compare_runs(runs[0].path, other.path)
        except LorakitError as exc:
            out.append(f"{runs[0].name} vs {other.name}: {exc}")
            continue
        for c in found:  # the first run's base model comes with every pair: shown once
            if (c.a, c.b) not in seen:
                seen.add((c.a, c.b))
                out.append(c)
    return out


def _default_metric(task: str) -> str:
    """The headline metric of runs that name none: their task's default (the loss for an unknown task)."""
    return get_task(task).default_metric if task in task_names() else "loss"
