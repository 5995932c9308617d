"""`lorakit import`: an adapter folder written by plain peft becomes a lorakit adapter.

peft writes ``adapter_config.json`` + ``adapter_model.safetensors``. lorakit's later stages (predict,
eval, export, publish, serve) also read ``lorakit.json``: the task, the label names, the base model
and its content hash, the config. This module works those out -- from the options, else from what
the folder and the base model already say -- and checks the adapter against the base before
anything is written::

    adapter_config.json ─► peft_type LORA?   task_type (SEQ_CLS, CAUSAL_LM) ─► task
                        └► base_model_name_or_path ─► base model (or --base)
    --labels, else the base config's id2label ─► label space, as many names as the saved head has rows
    base + PeftModel.from_pretrained ─► every saved tensor has a module of the same shape?
    ─► lorakit.json (the layout `lorakit train` writes) + model card, atomically
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.adapters import folder as artifacts
from lorakit.config.loading import validate_config
from lorakit.config.schema import RunConfig
from lorakit.data.labels import LabelSpace
from lorakit.errors import AdapterError, ConfigError, LorakitError
from lorakit.files import atomic
from lorakit.files.outputs import check_output_folder
from lorakit.models import modeling
from lorakit.tasks import get_task, task_names
from lorakit.tasks.base import Task

#: What the config records as training data of an imported adapter (lorakit never saw it).
UNKNOWN_DATA = "unknown (trained elsewhere; imported with lorakit import)"


@dataclass
class ImportResult:
    adapter_dir: Path
    task: str
    base_model: str
    labels: list[str] | None
    labels_from: str | None  # "--labels", "the base config's id2label" or None
    meta: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Reading the peft folder
# --------------------------------------------------------------------------------------------------


def read_peft_folder(folder: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a complete peft LoRA folder that lorakit has not seen yet.

    Raises:
        AdapterError: No such folder, files missing, pickled weights, not LoRA, or already imported.
    """
    p = Path(folder)
    if not (p / artifacts.ADAPTER_CONFIG).is_file():
        raise AdapterError(
            f"'{p}' has no {artifacts.ADAPTER_CONFIG}; pass the folder peft's save_pretrained wrote"
        )
    if not (p / artifacts.ADAPTER_WEIGHTS).is_file():
        if (p / "adapter_model.bin").is_file():
            raise AdapterError(
                f"'{p}' holds pickled adapter_model.bin weights; re-save the adapter with "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise AdapterError(f"'{p}' has no {artifacts.ADAPTER_WEIGHTS}: the adapter is incomplete")
    if (p / artifacts.METADATA_FILE).is_file():
        raise AdapterError(
            f"'{p}' already has {artifacts.METADATA_FILE}: it is a lorakit adapter; use it as it is"
        )
    try:
        cfg = json.loads((p / artifacts.ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"'{p / artifacts.ADAPTER_CONFIG}' is not valid JSON ({exc})") from None
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"'{p}' is a {cfg.get('peft_type')} adapter; lorakit imports LoRA adapters only")
    return cfg


def _weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(folder / artifacts.ADAPTER_WEIGHTS), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def _pick_task(peft_cfg: dict[str, Any], task: str | None) -> Task:
    if task:
        return get_task(task)
    task_type = peft_cfg.get("task_type")
    matches = [t for t in map(get_task, task_names()) if t.peft_task_type and t.peft_task_type == task_type]
    # A task built on another (preference tuning on causal LM) trains that kind of adapter further: the
    # plainer task is the one an adapter from elsewhere is.
    matches = [
        t for t in matches if not any(isinstance(t, type(o)) and type(t) is not type(o) for o in matches)
    ]
    if len(matches) != 1:
        found = f"peft task_type {task_type}" if task_type else "no peft task_type"
        raise LorakitError(
            f"import: the adapter says {found}, which does not name one lorakit task; pass --task "
            f"({', '.join(task_names())})"
        )
    return matches[0]


def head_rows(
    shapes: dict[str, tuple[int, ...]], modules_to_save: list[str], hidden: int | None
) -> int | None:
    """Outputs of the trained head (``modules_to_save``): the row count of its saved weights that is not
    the hidden size (RoBERTa's head has a dense hidden-to-hidden layer before the output layer)."""
    rows = set()
    for key, shape in shapes.items():
        path = key.removeprefix("base_model.model.")
        if (
            len(shape) == 2
            and key.endswith(".weight")
            and any(path == m or path.startswith(m + ".") or f".{m}." in f".{path}" for m in modules_to_save)
        ):
            rows.add(shape[0])
    outs = rows - {hidden} if len(rows) > 1 else rows
    return next(iter(outs)) if len(outs) == 1 else None


def _label_space(labels: list[str] | None, base_config: Any, rows: int | None) -> tuple[LabelSpace, str]:
    """The label names: from --labels, else the base config's id2label when it has as many as the head."""
    if labels:
        if len(set(labels)) != len(labels) or len(labels) < 2:
            raise LorakitError(
                f"--labels: {','.join(labels)}: give two or more distinct names, in class-id order"
            )
        return LabelSpace(tuple(labels)), "--labels"
    id2label = {int(k): str(v) for k, v in (getattr(base_config, "id2label", None) or {}).items()}
    if rows is None:
        raise LorakitError(
            "import: cannot tell how many classes the adapter's head has; name them in class-id "
            "order with --labels a,b,..."
        )
    if sorted(id2label) == list(range(rows)):
        return LabelSpace(tuple(id2label[i] for i in range(rows))), "the base config's id2label"
    raise LorakitError(
        f"import: the adapter's head has {rows} outputs but the base config names {len(id2label)} "
        "labels; name them in class-id order with --labels a,b,..."
    )


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------


def _targets(value: Any) -> list[str] | str | None:
    return sorted(value) if isinstance(value, (list, tuple, set)) else value


def _run_config(
    task: Task, base: str, peft_cfg: dict[str, Any], space: LabelSpace | None, max_length: int | None
) -> RunConfig:
    """The config an imported adapter records: the base, the LoRA settings as peft saved them, and
    data settings that only say how inputs are prepared (the training data is unknown)."""
    layers = peft_cfg.get("layers_to_transform")
    data: dict[str, Any] = {"train": UNKNOWN_DATA}
    if space is not None:
        data["label_names"] = list(space.labels)
    if max_length is not None:
        data["max_length"] = max_length
    raw = {
        "task": task.name,
        "data": data,
        "model": {"name_or_path": base},
        "lora": {
            "r": peft_cfg.get("r", 8),
            "alpha": peft_cfg.get("lora_alpha", 8),
            "dropout": peft_cfg.get("lora_dropout", 0.0),
            "target_modules": _targets(peft_cfg.get("target_modules")),
            "bias": peft_cfg.get("bias", "none"),
            "use_rslora": bool(peft_cfg.get("use_rslora")),
            "use_dora": bool(peft_cfg.get("use_dora")),
            "modules_to_save": list(peft_cfg.get("modules_to_save") or []),
            "layers": [layers] if isinstance(layers, int) else layers,
        },
    }
    try:
        return validate_config(raw)
    except ConfigError as exc:  # peft allows values lorakit's config does not
        raise ConfigError(exc.problems, source="adapter_config.json") from None


def _metadata(
    cfg: RunConfig,
    model_path: str,
    peft_model: Any,
    peft_cfg: dict[str, Any],
    space: LabelSpace | None,
    src: Path,
) -> dict[str, Any]:
    """``lorakit.json`` of the imported adapter, built as training builds it (``folder.build_metadata``,
    from the peft config as loaded): no data sizes or metrics (lorakit never saw the data), and
    ``imported``: where it came from."""
    base = peft_model.get_base_model()
    return artifacts.build_metadata(
        cfg,
        peft_model.peft_config["default"],
        resolved=model_path,
        model_type=getattr(base.config, "model_type", None),
        fingerprint=modeling.model_fingerprint(model_path, base),
        label_space=space,
        data_sizes={},
        data_stats={},
        parameters=modeling.count_parameters(peft_model),
        metrics={},
        imported={
            "from": str(src.resolve()),
            "peft_task_type": peft_cfg.get("task_type"),
            "base_model_name_or_path": peft_cfg.get("base_model_name_or_path"),
            "peft_version": peft_cfg.get("peft_version"),
        },
    )


def _saved_state(peft_model: Any) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _load_checked(
    task: Task,
    cfg: RunConfig,
    model_path: str,
    space: LabelSpace | None,
    folder: Path,
    shapes: dict[str, tuple[int, ...]],
) -> Any:
    """The peft model: the base loaded as lorakit loads it, the adapter applied and checked.

    Raises:
        AdapterError: peft refuses the adapter (missing targets, shape mismatch) or saved tensors have
            no module in this base (e.g. an adapter for more layers than the base has).
    """
    from peft import PeftModel

    base, _ = task.load_model(cfg.model, model_path, space, cfg.data)
    try:
        # is_trainable: peft marks what training trained (LoRA matrices, modules_to_save copies), so the
        # trainable parameters are counted as a run counts them; nothing here trains
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = (
            next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "")
            or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        )
        raise AdapterError(
            f"adapter '{folder}' does not fit base model '{model_path}': {first[:240]}"
        ) from None
    unused = sorted(set(shapes) - set(_saved_state(model)))
    if unused:
        raise AdapterError(
            f"adapter '{folder}' does not fit base model '{model_path}': {len(unused)} saved "
            f"tensor(s) have no module in it (e.g. {unused[0]}); pass the task (--task) and base "
            "(--base) it was trained with"
        )
    return model.eval()


def import_adapter(
    folder: str | Path,
    *,
    task: str | None = None,
    labels: list[str] | None = None,
    base_model: str | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    max_length: int | None = None,
) -> ImportResult:
    """Turn a peft LoRA folder into a lorakit adapter, checked against its base model.

    Args:
        folder: The folder peft's ``save_pretrained`` wrote.
        task: The lorakit task; default: from peft's ``task_type`` (SEQ_CLS, CAUSAL_LM).
        labels: Class names in class-id order (classification); default: the base config's id2label.
        base_model: The base model; default: ``base_model_name_or_path`` of adapter_config.json.
        out: Write a new adapter folder here; default: add lorakit.json to ``folder`` itself.
        overwrite: Replace a non-empty ``out``.
        max_length: Tokens per input at prediction time (text tasks); default: lorakit's default.

    Returns:
        Where the adapter is, and what was decided (task, base, labels and where they came from).

    Raises:
        AdapterError: Not a complete peft LoRA folder, already imported, or it does not fit the base.
        LorakitError: Task, base or labels cannot be told and no option names them; ``out`` taken.
        ModelError: The base model cannot be loaded.
    """
    src = Path(folder)
    peft_cfg = read_peft_folder(src)
    the_task = _pick_task(peft_cfg, task)
    base = base_model or peft_cfg.get("base_model_name_or_path")
    if not base:
        raise LorakitError(
            "import: adapter_config.json names no base model (base_model_name_or_path); pass --base"
        )
    target = src if out is None else check_output_folder(out, overwrite=overwrite, key="--out")
    shapes = _weight_shapes(src)

    provisional = _run_config(the_task, base, peft_cfg, None, max_length)
    model_path = modeling.resolve_model_path(provisional.model)
    space, labels_from = None, None
    if the_task.labelled:
        base_config = modeling.load_base_config(provisional.model, model_path)
        hidden = getattr(base_config, "hidden_size", None)
        space, labels_from = _label_space(
            labels, base_config, head_rows(shapes, list(peft_cfg.get("modules_to_save") or []), hidden)
        )
    elif labels:
        raise LorakitError(f"--labels: a {the_task.name} adapter has no classes; leave --labels out")
    cfg = _run_config(the_task, base, peft_cfg, space, max_length)
    peft_model = _load_checked(the_task, cfg, model_path, space, src, shapes)
    meta = _metadata(cfg, model_path, peft_model, peft_cfg, space, src)
    _write(src, target, meta)
    return ImportResult(target, the_task.name, base, list(space.labels) if space else None, labels_from, meta)


def _write(src: Path, target: Path, meta: dict[str, Any]) -> None:
    """lorakit.json and the model card, into ``src`` itself or a new folder with copies of peft's files."""
    from lorakit.adapters.card import model_card

    card = model_card(meta)
    if target.resolve() == src.resolve():
        readme = src / "README.md"
        # peft's save_pretrained writes a template card; ours replaces it, a card of the user's own stays.
        if not readme.is_file() or "# Model Card for Model ID" in readme.read_text(
            encoding="utf-8", errors="replace"
        ):
            atomic.write_text_atomic(readme, card)
        artifacts.write_metadata(src, meta)  # last: its presence marks the folder imported
        return
    with atomic.atomic_dir(target) as tmp:
        for name in (artifacts.ADAPTER_CONFIG, artifacts.ADAPTER_WEIGHTS):
            shutil.copy2(src / name, tmp / name)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        artifacts.write_metadata(tmp, meta)
