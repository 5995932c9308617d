"""`lorakit predict` and `lorakit generate`: the task's answers to raw inputs, from an adapter folder alone.

Each task answers one of them (``Task.cli_command``); the other refuses its adapters in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.adapters.build import LoadedAdapter, load_adapter
from lorakit.errors import DataError


class Predictor:
    """Keeps a base model + adapter loaded and predicts on batches of raw inputs.

    Examples:
        >>> p = Predictor.from_adapter("runs/imdb/adapter")
        >>> p(["A wonderful film."])[0]["label"]
    """

    def __init__(self, loaded: LoadedAdapter) -> None:
        self.loaded = loaded
        # Inputs are cut exactly as in training (max_length, truncation side).
        self.data_cfg = loaded.config.data

    @classmethod
    def from_adapter(cls, path: str | Path, *, device: str = "auto") -> Predictor:
        return cls(load_adapter(path, device=device))

    def __call__(self, inputs: list[Any], *, top_k: int = 1) -> list[dict[str, Any]]:
        if not inputs:
            raise DataError("no inputs to predict; pass texts as arguments or --file")
        a = self.loaded
        return a.task.predict(a.model, a.processor, inputs, a.label_space, self.data_cfg, top_k=top_k)


def generate(
    path: str | Path, prompts: list[str], *, device: str = "auto", use_adapter: bool = True, **options: Any
) -> list[dict[str, Any]]:
    """Answers of a causal-lm adapter to user messages (chat template applied, stops at end of turn).

    Args:
        path: Run or adapter directory.
        prompts: User messages.
        device: Where to run.
        use_adapter: False answers with the base model alone.
        **options: max_new_tokens, do_sample, temperature, top_p, seed, system.

    Raises:
        LorakitError: An adapter that answers with ``predict``, or no prompts.
    """
    loaded = load_adapter(path, device=device)
    if not prompts:
        raise DataError("no prompts to answer; pass them as arguments or --file")
    data_cfg = loaded.config.data
    a = loaded
    if use_adapter:  # (a task that answers with `predict` refuses here, in one line)
        return a.task.generate(a.model, a.processor, prompts, data_cfg, **options)
    with a.model.disable_adapter():
        return a.task.generate(a.model, a.processor, prompts, data_cfg, **options)


def predict(
    path: str | Path, inputs: list[Any], *, top_k: int = 1, device: str = "auto"
) -> list[dict[str, Any]]:
    """One-shot prediction: load the adapter at ``path`` and predict ``inputs``."""
    return Predictor.from_adapter(path, device=device)(inputs, top_k=top_k)
