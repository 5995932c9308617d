"""Task registry: name -> Task class. Adding a task is one module in this folder and one line below."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from lorakit.tasks.base import PreparedData, Task

# name: "module:Class" (imported on first use, so that `lorakit --help` does not pay for transformers)
REGISTRY: dict[str, str] = {
    "text-classification": "lorakit.tasks.text_classification:TextClassification",
    "image-classification": "lorakit.tasks.image_classification:ImageClassification",
    "causal-lm": "lorakit.tasks.causal_lm:CausalLM",
    "preference": "lorakit.tasks.preference:Preference",
}


def task_names() -> list[str]:
    """The registered task names, without importing any task."""
    return list(REGISTRY)


def task_class(name: str) -> type[Task]:
    """The Task class registered under ``name``.

    Raises:
        LorakitError: No such task.
    """
    if name not in REGISTRY:
        raise LorakitError(f"task '{name}' is not known; choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_task(name: str) -> Task:
    """A fresh instance of the task registered under ``name``.

    Raises:
        LorakitError: No such task.
    """
    return task_class(name)()


def __getattr__(name: str) -> object:
    # `from lorakit.tasks import Task, PreparedData` without importing torch at package import.
    if name in ("Task", "PreparedData"):
        from lorakit.tasks import base

        return getattr(base, name)
    raise AttributeError(name)


__all__ = ["REGISTRY", "PreparedData", "Task", "get_task", "task_class", "task_names"]
