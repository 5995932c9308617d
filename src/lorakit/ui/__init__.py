"""`lorakit ui`: a local web app to set up, watch, compare and try LoRA runs (see :mod:`.app`)."""

from lorakit.ui.app import create_app

__all__ = ["create_app"]
