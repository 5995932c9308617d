"""One way to build a model: base model + processor + adapter, from a run config or from an adapter dir.

    training, `check`:            resolve_config ─► open_base ─► (task.prepare) ─► build_model
    predict, eval, export, serve: load_adapter(dir) ─► lorakit.json ─► open_base ─► the same base loading

Every stage goes through these functions, so a base model is located, checked and loaded the same way
whether a run is starting or an adapter is being served. The task decides what "the model" is
(:meth:`~lorakit.tasks.base.Task.load_model`, ``apply_adapter``, ``prepare_model``); this module decides
nothing per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters.folder import find_adapter_dir, other_base, read_metadata
from lorakit.config.loading import saved_config
from lorakit.config.schema import DataConfig, ModelConfig, RunConfig
from lorakit.data.labels import LabelSpace
from lorakit.errors import AdapterError, LorakitError
from lorakit.models import modeling
from lorakit.tasks import get_task
from lorakit.tasks.base import Task


def resolve_config(cfg: RunConfig, task: Task, device: torch.device) -> RunConfig:
    """``cfg`` with every default that depends on the task, the model or the device filled in.

    The learning rate per architecture, the metric that selects the best adapter and its direction,
    and the evaluation batch size are decided here, before any model is built; the config saved with
    the run is then the one it ran with.
    """
    t = cfg.train
    metric = t.metric_for_best or task.default_metric
    resolved = {
        "learning_rate": t.learning_rate or modeling.default_learning_rate(cfg.model.name_or_path),
        "metric_for_best": metric,
        "greater_is_better": t.greater_is_better
        if t.greater_is_better is not None
        else task.greater_is_better(metric),
        # CPUs: larger evaluation batches only raise the memory peak; GPUs: 4x keeps them busy.
        "eval_batch_size": t.eval_batch_size or t.batch_size * (4 if device.type == "cuda" else 1),
    }
    return cfg.model_copy(update={"train": t.model_copy(update=resolved)})


@dataclass
class Base:
    """A located base model and its processor (tokenizer / image processor), before the weights load."""

    config: ModelConfig
    path: str  # what transformers (or the zoo) loads: a folder, a GGUF file, a Hub id, zoo:<name>
    processor: Any


def open_base(task: Task, model_cfg: ModelConfig, path: str | None = None) -> Base:
    """Locate the base model (``path`` when already resolved) and load its processor.

    Raises:
        ModelError: The model cannot be found, or its processor does not fit the task.
    """
    path = path or modeling.resolve_model_path(model_cfg)
    return Base(model_cfg, path, task.load_processor(model_cfg, path))


def build_model(task: Task, cfg: RunConfig, base: Base, label_space: LabelSpace | None) -> Any:
    """The base model shaped for the run (head, input size) with the trainable adapter applied.

    Returns:
        The ``peft.PeftModel``; ``.get_base_model()`` is the transformers (or zoo) model inside.

    Raises:
        ModelError: The model does not fit the task, or the LoRA settings do not fit the model.
    """
    model, new_modules = task.load_model(cfg.model, base.path, label_space, cfg.data)
    start = task.starting_adapter(cfg)
    folder = _starting_adapter(task, *start, base.path, model) if start else None
    model = task.prepare_model(task.apply_adapter(model, cfg, new_modules, folder))
    if cfg.train.gradient_checkpointing:  # a task's default is skipped where the model cannot
        required = "gradient_checkpointing" in cfg.train.model_fields_set
        modeling.enable_gradient_checkpointing(
            model, cfg.model.name_or_path, cfg.train.gradient_checkpointing, required=required
        )
    return model


def _starting_adapter(task: Task, key: str, location: str, model_path: str, model: Any) -> Path:
    """The adapter folder a run starts from, checked: an adapter of a task in ``task.starts_from``,
    trained on this base model.

    Raises:
        AdapterError: Another kind of adapter, or one of another base model.
    """
    folder = find_adapter_dir(location)
    meta = read_metadata(folder)
    if meta.get("task") not in task.starts_from:
        raise AdapterError(
            f"{key}: '{folder}' is a {meta.get('task')} adapter; start from a "
            f"{' or '.join(task.starts_from)} adapter of the same base model"
        )
    if other_base(meta["base_model"].get("fingerprint"), modeling.model_fingerprint(model_path, model)):
        raise AdapterError(
            f"{key}: '{folder}' was trained on another base model "
            f"({meta['base_model']['name_or_path']}); use its base model in model.name_or_path"
        )
    return folder


# ---- from an adapter directory ----------------------------------------------------------------------


@dataclass
class LoadedAdapter:
    """A base model with one adapter applied, ready for inference."""

    adapter_dir: Path
    meta: dict[str, Any]
    task: Task
    model: torch.nn.Module
    processor: Any
    label_space: LabelSpace | None
    device: torch.device
    config: RunConfig  # the run config the adapter was trained with
    model_path: str = ""  # where the base model was loaded from

    @property
    def data_cfg(self) -> DataConfig:
        """The data section the adapter was trained with (inputs are cut and transformed as then)."""
        return self.config.data


def _base_location(meta: dict[str, Any], override: str | None) -> tuple[ModelConfig, str]:
    base = meta["base_model"]
    if override:
        cfg = ModelConfig(name_or_path=override)
        return cfg, modeling.resolve_model_path(cfg)
    cfg = ModelConfig(name_or_path=base["name_or_path"], revision=base.get("revision"))
    # Prefer the original spelling (pkg:// resolves on any machine); fall back to the resolved path.
    try:
        return cfg, modeling.resolve_model_path(cfg)
    except LorakitError:
        resolved = base.get("resolved")
        if resolved and Path(resolved).exists():
            return cfg, resolved
        raise


def adapter_config(meta: dict[str, Any]) -> RunConfig:
    """The run config saved in an adapter's metadata (older adapters' extra keys are dropped).

    Raises:
        AdapterError: The metadata holds no usable config.
    """
    try:
        return saved_config(meta["config"])
    except (KeyError, TypeError, LorakitError) as exc:
        raise AdapterError(
            f"the adapter's lorakit.json holds no valid run config ({str(exc)[:200]}); retrain "
            "or re-import the adapter"
        ) from None


def load_adapter(
    path: str | Path,
    *,
    base_model: str | None = None,
    device: str = "auto",
    check_base: bool = True,
    adapter_name: str = "default",
) -> LoadedAdapter:
    """Load the base model named in an adapter's metadata and apply the adapter.

    Args:
        path: An adapter directory or a run directory holding ``adapter/``.
        base_model: Use this base model instead of the recorded one (it must have the same hash).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        check_base: Refuse a base whose content hash differs from the one recorded at training.
        adapter_name: peft's name for the adapter (a server loading many names each one).

    Raises:
        AdapterError: The directory is not a complete lorakit adapter, or the base model differs.
    """
    from peft import PeftModel

    adapter_dir = find_adapter_dir(path)
    meta = read_metadata(adapter_dir)
    task = get_task(meta.get("task", ""))
    config = adapter_config(meta)
    model_cfg, model_path = _base_location(meta, base_model)
    base = open_base(task, model_cfg, model_path)
    label_space = LabelSpace.from_dict(meta["label_space"]) if meta.get("label_space") else None
    model, _ = task.load_model(model_cfg, model_path, label_space, config.data)
    if check_base:
        expected = meta["base_model"].get("fingerprint")
        found = modeling.model_fingerprint(model_path, model)
        if other_base(expected, found):
            raise AdapterError(
                f"base model '{model_path}' differs from the one this adapter was trained on "
                f"(hash {found[:19]}… vs {expected[:19]}…); use the original base model"
            )
    try:
        with modeling.peft_wrap_warnings_off():
            model = PeftModel.from_pretrained(
                model, str(adapter_dir), adapter_name=adapter_name, is_trainable=False
            )
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterError(
            f"adapter '{adapter_dir}' does not fit base model '{model_path}' (shape or name "
            f"mismatch): {first[:200]}"
        ) from None
    model = task.prepare_model(model)
    dev = modeling.pick_device(device)
    model.to(dev).eval()
    return LoadedAdapter(adapter_dir, meta, task, model, base.processor, label_space, dev, config, model_path)
