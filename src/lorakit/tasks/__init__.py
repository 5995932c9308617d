"""The tasks, and their registry: name -> Task class. Adding a task is one module in this folder and one
line in ``REGISTRY`` below.

This module is a leaf: it names each task's module as a string and imports it on first use (as
transformers' auto mappings do), so the config layer can ask for a task's config classes by name without
depending on task code.

May import: this module, ``lorakit.errors`` only. The task modules (``base`` and each task): the layers up
to ``models`` (``errors``, ``files``, ``runtime``, ``config``, ``data``, ``models``) and each other, never
a stage (``adapters``, ``training``, ``evaluation``, ``export``, ``serving``, ``ui``, ``cli``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from lorakit.tasks.base import Task

# name: "module:Class" (imported on first use, so that `lorakit --help` does not pay for transformers)
REGISTRY: dict[str, str] = {
    "text-classification": "lorakit.tasks.text_classification:TextClassification",
    "image-classification": "lorakit.tasks.image_classification:ImageClassification",
    "causal-lm": "lorakit.tasks.causal_lm:CausalLM",
    "preference": "lorakit.tasks.preference:Preference",
    "token-classification": "lorakit.tasks.token_classification:TokenClassification",
    "grpo": "lorakit.tasks.grpo:GRPO",
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


__all__ = ["REGISTRY", "get_task", "task_class", "task_names"]
