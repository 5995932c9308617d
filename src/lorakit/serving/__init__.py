"""Using a finished adapter: ``prediction`` (``lorakit predict`` / ``generate``), ``engine`` (one base
model, many adapters, batched), ``mixed`` (the gathered LoRA kernel) and the HTTP app (``app`` with its
routers).

May import: the layers up to ``export`` (never ``ui`` or ``cli``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorakit.serving.app import create_app
    from lorakit.serving.engine import Engine

_LAZY = {"create_app": "lorakit.serving.app", "Engine": "lorakit.serving.engine"}


def __getattr__(name: str) -> Any:
    # FastAPI is the `serve` extra: `lorakit predict` imports this package without it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorakit.serving' has no attribute {name!r}")


__all__ = ["Engine", "create_app"]
