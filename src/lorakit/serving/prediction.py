"""`lorakit predict`: labels and probabilities for raw inputs, from an adapter directory alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.adapters.build import LoadedAdapter, load_adapter
from lorakit.errors import DataError


class Predictor:
    """Keeps a base model + adapter loaded and predicts on batches of raw inputs.

    Example:
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
        LorakitError: Not a causal-lm adapter, or no prompts.
    """
    from lorakit.errors import AdapterError

    loaded = load_adapter(path, device=device)
    if not loaded.task.generates:
        raise AdapterError(
            f"'{loaded.adapter_dir}' is a {loaded.task.name} adapter, which answers with "
            "labels; use lorakit predict"
        )
    if not prompts:
        raise DataError("no prompts to answer; pass them as arguments or --file")
    data_cfg = loaded.config.data
    a = loaded
    if use_adapter:
        return a.task.predict(a.model, a.processor, prompts, a.label_space, data_cfg, **options)
    with a.model.disable_adapter():
        return a.task.predict(a.model, a.processor, prompts, a.label_space, data_cfg, **options)


def predict(
    path: str | Path, inputs: list[Any], *, top_k: int = 1, device: str = "auto"
) -> list[dict[str, Any]]:
    """One-shot prediction: load the adapter at ``path`` and predict ``inputs``."""
    return Predictor.from_adapter(path, device=device)(inputs, top_k=top_k)
