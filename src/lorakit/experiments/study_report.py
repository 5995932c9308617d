"""What `lorakit tune` leaves at the end of a study, in its folder.

trials.csv         one row per trial: number, state, value, test value, params, seconds, run folder
best.yaml          the best trial's full run config, ready for `lorakit train best.yaml`
study.json         the summary `lorakit tune` prints (best trial, its params and test metric)
report/index.html  Optuna's plotly plots (optimisation history, parameter importances, parallel
                   coordinates, slice, intermediate values) with plotly.js embedded: opens offline
"""

from __future__ import annotations

import copy
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import yaml

from lorakit.files import atomic

PLOTS = (
    ("Optimisation history", "plot_optimization_history"),
    ("Parameter importances", "plot_param_importances"),
    ("Parallel coordinates", "plot_parallel_coordinate"),
    ("Slice", "plot_slice"),
    ("Intermediate values (pruning)", "plot_intermediate_values"),
)


def trial_rows(study: Any, tune: Any) -> list[dict[str, Any]]:
    """One plain dict per trial, params decoded to config values."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "test_value": t.user_attrs.get("test_value"),
                "params": tune.decode_params(t.params),
                "seconds": round(seconds, 1) if seconds is not None else None,
                "run_dir": t.user_attrs.get("run_dir"),
                "error": t.user_attrs.get("error"),
            }
        )
    return rows


def write_study_outputs(
    study: Any, tune: Any, base: dict[str, Any], metric: str, direction: str, study_dir: Path
) -> dict[str, Any]:
    """Write trials.csv, best.yaml, study.json and report/index.html; return the summary.

    Args:
        study: The Optuna study.
        tune: Its :class:`~lorakit.experiments.tuning.TuneConfig`.
        base: The run config every trial started from (plain data).
        metric: The optimised validation metric; ``direction`` maximize or minimize.
        study_dir: The study folder.

    Returns:
        ``{"study", "study_dir", "metric", "direction", "best", "trials"}``; ``best`` is None until a
        trial completed.
    """
    rows = trial_rows(study, tune)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = None
    if complete:
        bt = study.best_trial
        best = next(r for r in rows if r["number"] == bt.number)
        cfg = copy.deepcopy(base)
        values = best["params"] | {
            "train.metric_for_best": metric,
            "output.dir": str(Path(base["output"]["dir"]) / "best"),
        }
        for key, value in values.items():  # set as values, not --set text: YAML would read 1e-06 as a string
            *parents, last = key.split(".")
            node = cfg
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        header = f"# lorakit tune {study.study_name}: trial {bt.number}, validation {metric} {bt.value:.4f}\n"
        atomic.write_text_atomic(study_dir / "best.yaml", header + yaml.safe_dump(cfg, sort_keys=False))
    summary = {
        "study": study.study_name,
        "study_dir": str(study_dir),
        "metric": metric,
        "direction": direction,
        "best": best,
        "trials": rows,
    }
    atomic.write_text_atomic(study_dir / "trials.csv", _csv(rows, list(tune.space)))
    atomic.write_json_atomic(study_dir / "study.json", summary)
    write_html(study, summary, study_dir / "report")
    return summary


def _csv(rows: list[dict[str, Any]], keys: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["number", "state", "value", "test_value", *keys, "seconds", "run_dir", "error"])
    for r in rows:
        w.writerow(
            [
                r["number"],
                r["state"],
                r["value"],
                r["test_value"],
                *(json.dumps(r["params"].get(k)) for k in keys),
                r["seconds"],
                r["run_dir"],
                r["error"] or "",
            ]
        )
    return buf.getvalue()


def table(summary: dict[str, Any]) -> list[str]:
    """The trials as aligned text lines (what `lorakit tune` prints)."""
    keys = sorted({k for r in summary["trials"] for k in r["params"]})
    head = ["#", "state", summary["metric"], "test", *keys, "min"]
    lines = [head]
    for r in summary["trials"]:
        fmt = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
        lines.append(
            [
                str(r["number"]),
                r["state"].lower(),
                fmt(r["value"]),
                fmt(r["test_value"]),
                *(_short(r["params"][k]) if k in r["params"] else "-" for k in keys),
                "-" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v)


def write_html(study: Any, summary: dict[str, Any], out: Path) -> Path:
    """``out/index.html``: the trial table and Optuna's plotly figures, plotly.js embedded once (no CDN)."""
    import optuna.visualization as vis

    parts, embedded = [], False
    for title, name in PLOTS:
        try:
            fig = getattr(vis, name)(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances need two finished trials
            parts.append(f"<h2>{html.escape(title)}</h2><p class=note>not drawn: {html.escape(str(exc))}</p>")
            continue
        parts.append(
            f"<h2>{html.escape(title)}</h2>" + fig.to_html(full_html=False, include_plotlyjs=not embedded)
        )
        embedded = True
    best = summary["best"]
    best_line = (
        (
            f"best: trial {best['number']}, validation {summary['metric']} {best['value']:.4f}"
            + (f", test {best['test_value']:.4f}" if best.get("test_value") is not None else "")
        )
        if best
        else "no trial has completed yet"
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8">\
<title>lorakit tune: {html.escape(summary["study"])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}} \
pre{{background:#f5f5f5;padding:1em;overflow-x:auto}} .note{{color:#777}}</style></head>
<body><h1>lorakit tune: {html.escape(summary["study"])}</h1>
<p>{html.escape(best_line)} ({summary["direction"]}; {len(summary["trials"])} trials)</p>
<pre>{html.escape(chr(10).join(table(summary)))}</pre>
{"".join(parts)}
</body></html>"""
    atomic.write_text_atomic(out / "index.html", page)  # (processes sharing a study may write it at once)
    return out
