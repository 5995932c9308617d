"""Training events: what a tracker, a UI or a progress display hears from a run.

The training loop calls these methods on every callback it was given, in this order::

    on_start(run_dir, config, info)      once the run folder exists, before the first step
    on_log(row)  on_eval(row)  ...       each logged training row / each validation
    on_end(run_dir, final)               metrics.json, adapter/ and report/ are written
    close()                              always last, also when the run failed

Every method is a no-op here: a callback overrides the ones it needs. (Issue 21 moves this class to
``lorakit.training.events``; the methods and their arguments stay the same.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Callback:
    """A listener to one training run; override the events you need."""

    def on_start(self, run_dir: Path, config: dict[str, Any], info: dict[str, Any]) -> None:
        """The run folder exists. ``config`` is the resolved config (YAML-able), ``info`` holds the
        task, base model, data sizes and trainable / total parameters."""

    def on_log(self, row: dict[str, Any]) -> None:
        """A training row: ``{"step", "epoch", "split": "train", "loss", "lr"}``."""

    def on_eval(self, row: dict[str, Any]) -> None:
        """A validation row: ``{"step", "epoch", "split": "validation", "seconds", <scalar metrics>}``."""

    def on_end(self, run_dir: Path, final: dict[str, Any]) -> None:
        """The run is complete; ``final`` is the content of metrics.json."""

    def close(self) -> None:
        """Release what the callback holds; called after on_end, or alone when the run failed."""
