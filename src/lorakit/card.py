"""The model card (README.md) written into every adapter directory."""

from __future__ import annotations

import json
from typing import Any

from lorakit.tasks import get_task


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(meta: dict[str, Any]) -> str:
    """Markdown model card from an adapter's ``lorakit.json`` metadata."""
    base = meta["base_model"]
    cfg = meta["config"]
    lora = meta["lora"]
    labels = (meta.get("label_space") or {}).get("id2label", {})
    metrics = meta.get("metrics", {})
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base['name_or_path']}",
        "tags: [lora, lorakit, " + meta["task"] + "]",
        "---",
        "",
        f"# LoRA adapter for {meta['task']}",
        "",
        f"Trained with lorakit {meta['versions'].get('lorakit', '?')} on {meta['created_at']}.",
        "",
        "## Base model",
        f"- name: `{base['name_or_path']}`",
        f"- architecture: `{base.get('model_type')}`",
        f"- content hash: `{base['fingerprint']}`",
        "",
        "## Data",
        f"- train: `{cfg['data']['train']}`" + (f" where {cfg['data']['where']}" if cfg["data"].get("where") else ""),
        f"- examples: {json.dumps(meta.get('data', {}).get('sizes', {}))}",
    ]
    if labels:
        lines += ["", "## Labels", "", "| id | label |", "|---|---|"] + [f"| {i} | {n} |" for i, n in labels.items()]
    lines += [
        "",
        "## Hyperparameters",
        f"- LoRA: r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, rsLoRA={lora['use_rslora']}, DoRA={lora['use_dora']}",
        f"- target modules: {lora['target_modules']}",
        f"- trained fully (modules_to_save): {lora['modules_to_save']}",
        f"- trainable parameters: {meta['parameters']['trainable']:,} of {meta['parameters']['total']:,} "
        f"({100 * meta['parameters']['trainable'] / max(1, meta['parameters']['total']):.2f}%)",
        "- training: " + ", ".join(f"{k}={cfg['train'][k]}" for k in ("epochs", "batch_size", "gradient_accumulation_steps", "learning_rate", "scheduler", "warmup_ratio", "seed")),
    ]
    if metrics:
        lines += ["", "## Metrics", "", "| split | metric | value |", "|---|---|---|"]
        for split, values in metrics.items():
            lines += [f"| {split} | {k} | {_fmt(v)} |" for k, v in values.items() if isinstance(v, (int, float))]
    lines += [
        "",
        "## Intended use",
        f"{meta['task']} on data like the training data above. Check the metrics on your own held-out data before use;",
        "the adapter inherits the limitations and biases of its base model and training data.",
        "",
        "## Usage",
        "",
        "With lorakit:",
        "```bash",
        f"lorakit predict ADAPTER_DIR {get_task(meta['task']).example_input}",
        "```",
        "",
        "With plain peft:",
        "```python",
        *get_task(meta["task"]).usage(meta),
        "```",
        "",
    ]
    return "\n".join(lines)
