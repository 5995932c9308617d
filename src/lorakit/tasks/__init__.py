"""Task registry: name -> Task. Adding a task means adding a module here and one entry below."""

from __future__ import annotations

from lorakit.errors import LorakitError
from lorakit.tasks.base import PreparedData, Task


def get_task(name: str) -> Task:
    """Return the task registered under ``name``.

    Raises:
        LorakitError: No such task.
    """
    # Imported lazily so that `lorakit --help` does not pay for transformers.
    from lorakit.tasks.causal_lm import CausalLM
    from lorakit.tasks.image_classification import ImageClassification
    from lorakit.tasks.text_classification import TextClassification

    registry: dict[str, type[Task]] = {t.name: t for t in (TextClassification, ImageClassification, CausalLM)}
    if name not in registry:
        raise LorakitError(f"task '{name}' is not known; choose one of {', '.join(registry)}")
    return registry[name]()


__all__ = ["PreparedData", "Task", "get_task"]
