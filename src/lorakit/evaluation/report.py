"""A report a person opens: ``report/index.html`` with PNG plots (loss curves, confusion matrices).

What a report shows beyond the scalar metrics is the task's: the validation metrics drawn as curves
(``Task.curve_metrics``) and each split's sections (``Task.report_sections``: tables and matrices),
rendered here without knowing which task made them."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from lorakit.files.atomic import atomic_dir
from lorakit.tasks.base import ReportImage, ReportMatrix, ReportSection, Task


def _plot_history(history: list[dict[str, Any]], out: Path, curve_metrics: tuple[str, ...]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if r["split"] == "train"]
    val = [r for r in history if r["split"] == "validation"]
    if not train and not val:
        return None
    metric_keys = [k for k in curve_metrics if val and k in val[0]]
    # metrics an online task logs while it trains (its rewards), drawn beside the validation ones
    train_keys = [k for k in curve_metrics if any(k in r for r in train)]
    panels = bool(metric_keys or train_keys)
    fig, axes = plt.subplots(1, 2 if panels else 1, figsize=(11 if panels else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    val_loss = [r for r in val if "loss" in r]
    if val_loss:
        ax.plot([r["step"] for r in val_loss], [r["loss"] for r in val_loss], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if panels:
        ax = axes[0][1]
        for k in train_keys:
            rows = [r for r in train if k in r]  # rows of steps that generated (RL: the first of its passes)
            ax.plot([r["step"] for r in rows], [r[k] for r in rows], alpha=0.6, label=f"train {k}")
        for k in metric_keys:
            ax.plot([r["step"] for r in val], [r[k] for r in val], "o-", label=k)
        values = [r[k] for r in val for k in metric_keys]
        values += [r[k] for r in train for k in train_keys if k in r]
        if all(0 <= v <= 1 for v in values):  # shares: show them on the full 0-1 scale
            ax.set_ylim(max(0.0, min(values) - 0.1), 1.0)
        if len(val) == 1 and not train_keys:  # one evaluation: a point from step 0, its values beside it
            ax.set_xlim(0, val[0]["step"] * 1.25 or 1)
            for k in metric_keys:
                ax.annotate(
                    f"{val[0][k]:.4f}",
                    (val[0]["step"], val[0][k]),
                    textcoords="offset points",
                    xytext=(-10, 8),
                    ha="right",
                )
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("optimizer step")
        ax.set_title("Validation metrics" if not train_keys else "Metrics")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return "curves.png"


def _plot_confusion(cm: list[list[int]], labels: tuple[str, ...], out: Path, name: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(cm)
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(labels) <= 20:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(
                    j,
                    i,
                    str(m[i, j]),
                    ha="center",
                    va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black",
                    fontsize=9,
                )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _scalar_table(evaluations: dict[str, dict[str, Any] | None]) -> str:
    keys: list[str] = []
    for m in evaluations.values():
        for k, v in (m or {}).items():
            if isinstance(v, (int, float)) and k not in keys:
                keys.append(k)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = []
    for split, m in evaluations.items():
        cells = "".join(
            f"<td>{m[k]:.4f}</td>" if m and isinstance(m.get(k), (int, float)) else "<td>-</td>" for k in keys
        )
        rows.append(f"<tr><th>{html.escape(split)}</th>{cells}</tr>")
    return f"<table><tr><th>split</th>{head}</tr>{''.join(rows)}</table>"


def _thumbnail(reference: str, out: Path, name: str) -> str | None:
    """A small PNG of an image example inside the report folder, or None when it cannot be read."""
    from lorakit.data.images import BadImage, load_image

    try:
        img = load_image(reference)
    except (BadImage, OSError, ValueError):
        return None
    img.thumbnail((96, 96))
    img.save(out / f"{name}.png")
    return f"{name}.png"


def _cell(value: Any, out: Path, name: str) -> str:
    """One table cell: a thumbnail for an image example, numbers to 3 decimals, long text as <pre>."""
    if isinstance(value, ReportImage):
        thumb = _thumbnail(value.reference, out, name)
        return f'<img src="{thumb}" alt="{html.escape(value.text)}">' if thumb else html.escape(value.text)
    if isinstance(value, float):
        return f"{value:.3f}"
    text = html.escape(str(value))
    return f"<pre>{text}</pre>" if "\n" in text or len(text) > 120 else text


def _section(section: ReportSection, out: Path, name: str) -> str:
    """A task's report section as HTML (a matrix as a PNG plot, a table as a table)."""
    title = html.escape(section.title)
    if isinstance(section, ReportMatrix):
        img = _plot_confusion(section.values, tuple(section.labels), out, f"{name}.png", section.title)
        return f'<h2>{title}</h2><img src="{img}" alt="{title}">'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in section.columns)
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{_cell(v, out, f'{name}_{i}' + (f'_{j}' if j else ''))}</td>" for j, v in enumerate(row)
        )
        + "</tr>"
        for i, row in enumerate(section.rows)
    )
    return f'<h2>{title}</h2><table class="samples {section.kind}"><tr>{head}</tr>{rows}</table>'


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    history: list[dict[str, Any]],
    evaluations: dict[str, dict[str, Any] | None],
    task: Task,
    label_space: Any,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``index.html`` and its plots into ``out_dir`` (atomically replaced).

    Args:
        out_dir: The report folder.
        title: Page title.
        history: Training history rows (``split`` train / validation, ``step``, ``loss``, metrics).
        evaluations: Split name -> metrics dict.
        task: The adapter's task: its curve metrics and the sections of each split.
        label_space: The task's label space, or None.
        meta: Adapter metadata shown as a summary.

    Returns:
        The path of ``index.html``.
    """
    with atomic_dir(out_dir) as tmp:
        parts = [f"<h1>{html.escape(title)}</h1>"]
        if meta:
            base = meta.get("base_model", {})
            lora = meta.get("lora", {})
            params = meta.get("parameters", {})
            parts.append(
                f"<p>Base model <code>{html.escape(str(base.get('name_or_path')))}</code> "
                f"({html.escape(str(base.get('model_type')))}); "
                f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')} "
                f"on <code>{html.escape(str(lora.get('target_modules')))}</code>; "
                f"trainable {params.get('trainable', 0):,} of {params.get('total', 0):,} parameters.</p>"
            )
        parts.append("<h2>Metrics</h2>" + _scalar_table(evaluations))
        curves = _plot_history(history, tmp, task.curve_metrics)
        if curves:
            parts.append(f'<h2>Training curves</h2><img src="{curves}" alt="loss and metric curves">')
        for i, (split, m) in enumerate(evaluations.items()):
            kinds: list[str] = []  # files are named <kind>_<split>[_<n>]: report/confusion_0.png
            for section in task.report_sections(split, m or {}, label_space):
                n = kinds.count(section.kind)
                kinds.append(section.kind)
                parts.append(_section(section, tmp, f"{section.kind}_{i}" + (f"_{n}" if n else "")))
        style = (
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}"
            "th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}"
            "th:first-child{text-align:left}.samples td{text-align:left;vertical-align:top}"
            "pre{white-space:pre-wrap;margin:0;max-width:600px}img{max-width:100%;border:1px solid #eee}"
            "code{background:#f4f4f4;padding:1px 4px}"
        )
        page = (
            f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
        )
        (tmp / "index.html").write_text(page, encoding="utf-8")
    return Path(out_dir) / "index.html"
