"""`lorakit eval`: score an adapter on a labelled data file; write metrics.json and an HTML report."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lorakit.adapters.build import load_adapter
from lorakit.data.sources import filter_rows, require_columns
from lorakit.evaluation.report import write_report
from lorakit.files.atomic import write_json_atomic

log = logging.getLogger("lorakit")


def evaluate(
    path: str | Path,
    data: str,
    *,
    out_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Evaluate a trained adapter on ``data`` with the columns and preprocessing it was trained with.

    Args:
        path: A run directory or an adapter directory.
        data: A csv/json/jsonl/parquet file (or pkg:// path, or Hub name) with the same columns.
        out_dir: Where to write ``metrics.json`` and ``report/``; default ``<run>/eval-<data stem>``.
        batch_size: Examples per forward pass.
        device: Where to run.
        max_samples: Score only the first N rows.

    Returns:
        The metrics (loss, accuracy, f1_macro, per_class, confusion_matrix for classification).

    Raises:
        LorakitError: Bad adapter, unreadable data, missing columns or unknown labels.
    """
    loaded = load_adapter(path, device=device)
    cfg = loaded.config.model_copy(
        update={
            "data": loaded.config.data.model_copy(update={"train": data, "validation": None, "test": None})
        }
    )
    data_cfg = cfg.data
    ds = loaded.task.read_data(data, data_cfg, key="--data")
    ds = filter_rows(ds, data_cfg.where, key="--data")
    require_columns(ds, loaded.task.columns(data_cfg), key="--data", data_cfg=data_cfg)
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    ds = loaded.task.encode_labels(ds, data_cfg, loaded.label_space, key="--data")
    ds = loaded.task.preprocess(ds, loaded.processor, data_cfg, loaded.label_space, key="--data")
    metrics = loaded.task.evaluate(
        loaded.model,
        ds,
        loaded.processor,
        cfg,
        loaded.label_space,
        batch_size=batch_size,
        device=loaded.device,
    )
    metrics |= {"examples": len(ds), "data": data}

    run_dir = loaded.adapter_dir.parent if loaded.adapter_dir.name == "adapter" else loaded.adapter_dir
    out = Path(out_dir) if out_dir else run_dir / f"eval-{Path(data).stem}"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", metrics)
    history_file = run_dir / "history.jsonl"
    history = (
        [json.loads(line) for line in history_file.read_text().splitlines()] if history_file.is_file() else []
    )
    write_report(
        out / "report",
        title=f"Evaluation of {loaded.adapter_dir} on {data}",
        history=history,
        evaluations={Path(data).name: metrics},
        task=loaded.task,
        label_space=loaded.label_space,
        meta=loaded.meta,
    )
    metrics["output_dir"] = str(out)
    return metrics
