"""`lorakit ui`: a local web app to set up, watch, compare and try LoRA runs (see :mod:`.app`): one
router per page (``pages_*``), the workspace of run folders (``workspace``), processes (``launch``).

May import: every layer below it, up to ``serving`` (the "try it" panel uses the serving engine).
"""

from lorakit.ui.app import create_app

__all__ = ["create_app"]
