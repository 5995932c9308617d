"""`lorakit serve`: many adapters on one base model over HTTP (engine + FastAPI app)."""

from lorakit.serving.app import create_app
from lorakit.serving.engine import Engine

__all__ = ["Engine", "create_app"]
