"""The model card (README.md) written into every adapter directory."""

from __future__ import annotations

import json
from typing import Any

from lorakit.tasks import get_task


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(meta: dict[str, Any]) -> str:
    """Markdown model card from an adapter's ``lorakit.json`` metadata."""
    task = get_task(meta["task"])
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
        (
            "Trained elsewhere with peft; imported by lorakit "
            f"{meta['versions'].get('lorakit', '?')} on {meta['created_at']} (`lorakit import`)."
            if meta.get("imported")
            else f"Trained with lorakit {meta['versions'].get('lorakit', '?')} on {meta['created_at']}."
        ),
        "",
        "## Base model",
        f"- name: `{base['name_or_path']}`",
        f"- architecture: `{base.get('model_type')}`",
        f"- content hash: `{base['fingerprint']}`",
        "",
        "## Data",
        f"- train: `{cfg['data']['train']}`"
        + (f" where {cfg['data']['where']}" if cfg["data"].get("where") else ""),
        f"- examples: {json.dumps(meta.get('data', {}).get('sizes', {}))}",
    ]
    if labels:
        lines += ["", "## Labels", "", "| id | label |", "|---|---|"] + [
            f"| {i} | {n} |" for i, n in labels.items()
        ]
    lines += [
        "",
        "## Hyperparameters",
        f"- LoRA: r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
        f"rsLoRA={lora['use_rslora']}, DoRA={lora['use_dora']}",
        f"- target modules: {lora['target_modules']}",
        f"- trained fully (modules_to_save): {lora['modules_to_save']}",
        f"- trainable parameters: {meta['parameters']['trainable']:,} of {meta['parameters']['total']:,} "
        f"({100 * meta['parameters']['trainable'] / max(1, meta['parameters']['total']):.2f}%)",
        "- training: "
        + ", ".join(
            f"{k}={cfg['train'][k]}"
            for k in (
                "epochs",
                "batch_size",
                "gradient_accumulation_steps",
                "learning_rate",
                "scheduler",
                "warmup_ratio",
                "seed",
            )
        ),
    ]
    if metrics:
        lines += ["", "## Metrics", "", "| split | metric | value |", "|---|---|---|"]
        for split, values in metrics.items():
            lines += [
                f"| {split} | {k} | {_fmt(v)} |" for k, v in values.items() if isinstance(v, (int, float))
            ]
    lines += [
        "",
        "## Intended use",
        f"{meta['task']} on data like the training data above. Check the metrics on your "
        "own held-out data before use;",
        "the adapter inherits the limitations and biases of its base model and training data.",
        "",
        "## Usage",
        "",
        "With lorakit:",
        "```bash",
        f"lorakit {task.cli_command} ADAPTER_DIR {task.example_input}",
        "# or from the registry: lorakit publish ADAPTER_DIR --name NAME; "
        "lorakit registry pull NAME --to DIR",
        "```",
        "",
        "With plain peft:",
        "```python",
        *task.usage(meta),
        "```",
        "",
    ]
    return "\n".join(lines)


def merged_card(meta: dict[str, Any], provenance: dict[str, Any], *, zoo_format: bool = False) -> str:
    """Markdown card of a merged export (``lorakit export --merge``)."""
    base = meta["base_model"]
    check = provenance["verification"]
    labels = (meta.get("label_space") or {}).get("id2label", {})
    metrics = meta.get("metrics", {})
    model_cls, proc_cls = get_task(meta["task"]).auto_classes
    lines = [
        "---",
        f"library_name: {'lorakit' if zoo_format else 'transformers'}",
        f"base_model: {base['name_or_path']}",
        "tags: [lorakit, merged-lora, " + meta["task"] + "]",
        "---",
        "",
        f"# {meta['task']} model: base + LoRA adapter, merged",
        "",
        f"The LoRA update `W += B @ A * scaling` of adapter `{provenance['adapter']['content_hash']}` "
        "folded into",
        f"`{base['name_or_path']}` (content hash `{base.get('fingerprint')}`), exported by "
        f"lorakit on {provenance['created_at']}.",
        "",
        "## Verification",
        f"Check inputs: {check['checked_inputs']} in batches of different shapes; logits of the "
        "unmerged adapter vs this folder reloaded from disk.",
        "The check is made in float64, which isolates the merge from float32 rounding; float32 "
        "figures are shown beside it.",
        "",
        "| comparison | largest absolute logit difference | tolerance |",
        "|---|---|---|",
        f"| merged vs unmerged, float64 | {check['merged_max_abs_diff']:.3g} | {check['tolerance']:g} |",
        f"| merged vs unmerged, float32 | {check['merged_max_abs_diff_fp32']:.3g} | |",
        f"| unmerged float32 vs float64 (rounding alone) | {check['fp32_noise']:.3g} | |",
    ]
    if check.get("onnx_max_abs_diff") is not None:
        lines.append(
            f"| ONNX (onnxruntime, float32) `{check['onnx']}` vs unmerged float32 | "
            f"{check['onnx_max_abs_diff']:.3g} | {check['tolerance']:g} |"
        )
    if labels:
        lines += ["", "## Labels", "", "| id | label |", "|---|---|"] + [
            f"| {i} | {n} |" for i, n in labels.items()
        ]
    if metrics:
        lines += ["", "## Metrics of the adapter", "", "| split | metric | value |", "|---|---|---|"]
        for split, values in metrics.items():
            lines += [
                f"| {split} | {k} | {_fmt(v)} |" for k, v in values.items() if isinstance(v, (int, float))
            ]
    lines += ["", "## Usage", "", "```python"]
    if zoo_format:
        lines += [
            "from lorakit import zoo  # the backbone has no Hugging Face format",
            'model = zoo.load_merged("MODEL_DIR").eval()',
        ]
    else:
        lines += [
            f"from transformers import {model_cls}, {proc_cls}",
            "",
            f'model = {model_cls}.from_pretrained("MODEL_DIR").eval()',
            f'processor = {proc_cls}.from_pretrained("MODEL_DIR")',
        ]
    lines.append("```")
    if check.get("onnx"):
        lines += [
            "",
            "With onnxruntime (inputs named as the model's own, batch and sequence axes dynamic):",
            "```python",
            "import onnxruntime as ort",
            f'session = ort.InferenceSession("MODEL_DIR/{check["onnx"]}")',
            'logits = session.run(["logits"], inputs)[0]  # inputs: dict of numpy arrays',
            "```",
        ]
    lines.append("")
    return "\n".join(lines)
