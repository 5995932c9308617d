"""Load an adapter directory for evaluation or prediction, from the adapter dir alone.

The base model location, task and label space come from ``lorakit.json``; the base model is
checked against the hash recorded at training time, so a different base cannot slip in silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit import modeling
from lorakit.artifacts import find_adapter_dir, read_metadata
from lorakit.config import DataConfig, ModelConfig
from lorakit.errors import AdapterError, LorakitError
from lorakit.labels import LabelSpace
from lorakit.tasks import Task, get_task


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
    data_cfg: DataConfig | None = None  # the data section the adapter was trained with
    model_path: str = ""  # where the base model was loaded from


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
        if resolved and Path(resolved).is_dir():
            return cfg, resolved
        raise


def load_adapter(path: str | Path, *, base_model: str | None = None, device: str = "auto", check_base: bool = True) -> LoadedAdapter:
    """Load the base model named in an adapter's metadata and apply the adapter.

    Args:
        path: An adapter directory or a run directory holding ``adapter/``.
        base_model: Use this base model instead of the recorded one (it must have the same hash).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        check_base: Refuse a base whose content hash differs from the one recorded at training.

    Raises:
        AdapterError: The directory is not a complete lorakit adapter, or the base model differs.
    """
    from peft import PeftModel

    adapter_dir = find_adapter_dir(path)
    meta = read_metadata(adapter_dir)
    task = get_task(meta.get("task", ""))
    model_cfg, model_path = _base_location(meta, base_model)
    label_space = LabelSpace.from_dict(meta["label_space"]) if meta.get("label_space") else None
    processor = task.load_processor(model_cfg, model_path)
    data_cfg = DataConfig.model_validate(meta["config"]["data"]) if meta.get("config", {}).get("data") else None
    base, _ = task.load_model(model_cfg, model_path, label_space, data_cfg)
    if check_base:
        expected = meta["base_model"].get("fingerprint")
        found = modeling.model_fingerprint(model_path, base)
        if expected and expected != "unknown" and found != "unknown" and expected != found:
            raise AdapterError(
                f"base model '{model_path}' differs from the one this adapter was trained on "
                f"(hash {found[:19]}… vs {expected[:19]}…); use the original base model"
            )
    try:
        with modeling.peft_wrap_warnings_off():
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterError(f"adapter '{adapter_dir}' does not fit base model '{model_path}' (shape or name mismatch): {first[:200]}") from None
    model = task.prepare_model(model)
    dev = modeling.pick_device(device)
    model.to(dev).eval()
    return LoadedAdapter(adapter_dir, meta, task, model, processor, label_space, dev, data_cfg, model_path)
