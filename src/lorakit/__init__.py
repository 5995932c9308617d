"""lorakit: from a pretrained model and your own data to a fine-tuned, evaluated LoRA adapter.

The Python API; the ``lorakit`` command wraps exactly these functions::

    import lorakit
    cfg = lorakit.load_config("configs/imdb-minilm.yaml", ["train.epochs=1"])
    result = lorakit.train(cfg)
    metrics = lorakit.evaluate(result.run_dir, data="reviews.csv")
    lorakit.predict(result.adapter_dir, ["What a film!"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorakit.config.loading import load_config
from lorakit.config.schema import RunConfig
from lorakit.errors import AdapterError, ConfigError, DataError, LorakitError, ModelError, RunDirError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lorakit.evaluation.scoring import evaluate
    from lorakit.serving.prediction import Predictor, predict
    from lorakit.training import train
    from lorakit.training.preflight import check

_LAZY = {
    "train": "lorakit.training",
    "evaluate": "lorakit.evaluation.scoring",
    "predict": "lorakit.serving.prediction",
    "Predictor": "lorakit.serving.prediction",
    "check": "lorakit.training.preflight",
}


def __getattr__(name: str) -> Any:
    # Heavy imports (torch, transformers) only when a stage is used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


__all__ = [
    "AdapterError",
    "ConfigError",
    "DataError",
    "LorakitError",
    "ModelError",
    "Predictor",
    "RunConfig",
    "RunDirError",
    "check",
    "evaluate",
    "load_config",
    "predict",
    "train",
]
