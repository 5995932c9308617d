"""The model cards (README.md): of every adapter directory, and of a merged export.

Each card is a list of sections (front matter, base model, data, labels, hyperparameters, metrics,
usage), each built by its own function from ``lorakit.json``'s metadata.
"""

from __future__ import annotations

import json
from typing import Any

from lorakit.config.schema import METHOD_NAMES
from lorakit.tasks import get_task

#: The training settings a card lists, in this order.
CARD_TRAIN_KEYS = (
    "epochs",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "scheduler",
    "warmup_ratio",
    "seed",
)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------------
# The adapter's card
# --------------------------------------------------------------------------------------------------


def model_card(meta: dict[str, Any]) -> str:
    """Markdown model card from an adapter's ``lorakit.json`` metadata."""
    lines = [
        *_front_matter(meta, library="peft", tags=["lora", "lorakit"]),
        f"# LoRA adapter for {meta['task']}",
        "",
        _made_by(meta),
        "",
        *_base_and_data(meta),
        *_labels(meta),
        *_hyperparameters(meta),
        *_metrics(meta, "## Metrics"),
        *_intended_use_and_usage(meta),
    ]
    return "\n".join(lines)


def _front_matter(meta: dict[str, Any], *, library: str, tags: list[str]) -> list[str]:
    return [
        "---",
        f"library_name: {library}",
        f"base_model: {meta['base_model']['name_or_path']}",
        "tags: [" + ", ".join([*tags, meta["task"]]) + "]",
        "---",
        "",
    ]


def _made_by(meta: dict[str, Any]) -> str:
    made = f"{meta['versions'].get('lorakit', '?')} on {meta['created_at']}"
    if meta.get("imported"):
        return f"Trained elsewhere with peft; imported by lorakit {made} (`lorakit import`)."
    return f"Trained with lorakit {made}."


def _base_and_data(meta: dict[str, Any]) -> list[str]:
    base, data = meta["base_model"], meta["config"]["data"]
    return [
        "## Base model",
        f"- name: `{base['name_or_path']}`",
        f"- architecture: `{base.get('model_type')}`",
        f"- content hash: `{base['fingerprint']}`",
        "",
        "## Data",
        f"- train: `{data['train']}`" + (f" where {data['where']}" if data.get("where") else ""),
        f"- examples: {json.dumps(meta.get('data', {}).get('sizes', {}))}",
    ]


def _labels(meta: dict[str, Any]) -> list[str]:
    labels = (meta.get("label_space") or {}).get("id2label", {})
    if not labels:
        return []
    return ["", "## Labels", "", "| id | label |", "|---|---|"] + [
        f"| {i} | {n} |" for i, n in labels.items()
    ]


def _method_line(lora: dict[str, Any]) -> str:
    """The adapter's method and its settings (LoRA's variants; LoHa / LoKr's convolution form)."""
    method = lora.get("method", "lora")
    if method == "lora":
        return (
            f"- LoRA: r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
            f"rsLoRA={lora['use_rslora']}, DoRA={lora['use_dora']}"
        )
    name = METHOD_NAMES.get(method, method)
    return f"- {name}: r={lora['r']}, alpha={lora['alpha']}, effective_conv2d={lora.get('effective_conv2d')}"


def _hyperparameters(meta: dict[str, Any]) -> list[str]:
    lora, params, train = meta["lora"], meta["parameters"], meta["config"]["train"]
    return [
        "",
        "## Hyperparameters",
        _method_line(lora),
        f"- target modules: {lora['target_modules']}",
        f"- trained fully (modules_to_save): {lora['modules_to_save']}",
        f"- trainable parameters: {params['trainable']:,} of {params['total']:,} "
        f"({100 * params['trainable'] / max(1, params['total']):.2f}%)",
        "- training: " + ", ".join(f"{k}={train[k]}" for k in CARD_TRAIN_KEYS),
    ]


def _metrics(meta: dict[str, Any], heading: str) -> list[str]:
    metrics = meta.get("metrics", {})
    if not metrics:
        return []
    lines = ["", heading, "", "| split | metric | value |", "|---|---|---|"]
    for split, values in metrics.items():
        lines += [f"| {split} | {k} | {_fmt(v)} |" for k, v in values.items() if isinstance(v, (int, float))]
    return lines


def _intended_use_and_usage(meta: dict[str, Any]) -> list[str]:
    task = get_task(meta["task"])
    return [
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


# --------------------------------------------------------------------------------------------------
# The merged export's card
# --------------------------------------------------------------------------------------------------


def merged_card(meta: dict[str, Any], provenance: dict[str, Any], *, zoo_format: bool = False) -> str:
    """Markdown card of a merged export (``lorakit export --merge``).

    Args:
        meta: The adapter's ``lorakit.json``.
        provenance: The export's ``lorakit-export.json`` (:func:`lorakit.export.common.provenance`).
        zoo_format: The model is a zoo backbone (no Hugging Face format; lorakit's loader rebuilds it).
    """
    base = meta["base_model"]
    adapter = next(iter(provenance["adapters"].values()))
    lines = [
        *_front_matter(
            meta, library="lorakit" if zoo_format else "transformers", tags=["lorakit", "merged-lora"]
        ),
        f"# {meta['task']} model: base + LoRA adapter, merged",
        "",
        f"The LoRA update `W += B @ A * scaling` of adapter `{adapter['content_hash']}` folded into",
        f"`{base['name_or_path']}` (content hash `{base.get('fingerprint')}`), exported by "
        f"lorakit on {provenance['created_at']}.",
        "",
        *_verification(provenance["verification"]),
        *_labels(meta),
        *_metrics(meta, "## Metrics of the adapter"),
        *_merged_usage(meta, provenance["verification"], zoo_format=zoo_format),
    ]
    return "\n".join(lines)


def _verification(check: dict[str, Any]) -> list[str]:
    lines = [
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
    return lines


def _merged_usage(meta: dict[str, Any], check: dict[str, Any], *, zoo_format: bool) -> list[str]:
    lines = ["", "## Usage", "", "```python"]
    if zoo_format:
        lines += [
            "from lorakit import zoo  # the backbone has no Hugging Face format",
            'model = zoo.load_merged("MODEL_DIR").eval()',
        ]
    else:
        model_cls, proc_cls = get_task(meta["task"]).auto_classes
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
    return lines
