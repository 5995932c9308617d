"""Training events: what a progress bar, TensorBoard, a tracker or a web page subscribes to.

The recipe calls each :class:`Callback` method at its moment; a subscriber overrides the ones it needs.
Only the process that writes (rank 0) gets events.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("lorakit")

_NOT_METRICS = ("step", "epoch", "split", "seconds")


class Callback:
    """No-op hooks; subclasses override what they need."""

    def on_start(self, run_dir: Path, config: dict[str, Any], info: dict[str, Any]) -> None:
        """The run folder is ready; ``config`` is the resolved config, ``info`` the task, base model and
        its type, data sizes, trainable / total parameters and total steps."""

    def on_step(self, step: int) -> None:
        """An optimizer step finished."""

    def on_log(self, row: dict[str, Any]) -> None:
        """A training-loss row: step, epoch, split="train", loss, lr."""

    def on_eval(self, row: dict[str, Any]) -> None:
        """A validation row: step, epoch, split="validation", seconds and the scalar metrics."""

    def on_end(self, run_dir: Path, final: dict[str, Any]) -> None:
        """The run is complete: ``final`` is metrics.json; adapter/ and report/ are written."""

    def close(self) -> None:
        """The run ended (finished or not): release what was opened."""


class SharedCores(Callback):
    """Re-divides the CPU cores among the machine's trainings between steps (see
    :mod:`lorakit.runtime.sharing`): threads can only change on the thread that runs the steps."""

    def __init__(self, share: Any) -> None:
        self.share = share

    def on_start(self, run_dir: Any, config: Any, info: Any) -> None:
        # said once the run is under way, not before a config or folder error ends it in one line
        if self.share.pending:
            log.info(self.share.pending)
            self.share.pending = None

    def on_step(self, step: int) -> None:
        self.share.apply()


class Events(Callback):
    """Calls every subscriber in order. A subscriber that fails is logged and dropped: an
    observer never stops a run."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)

    def _each(self, method: str, *args: Any) -> None:
        for cb in list(self.callbacks):
            try:
                getattr(cb, method)(*args)
            except Exception as exc:  # a tracker losing its connection must not cost the run
                log.warning(
                    "%s stopped receiving training events: %s: %s", type(cb).__name__, type(exc).__name__, exc
                )
                self.callbacks.remove(cb)

    def on_start(self, run_dir: Path, config: dict[str, Any], info: dict[str, Any]) -> None:
        self._each("on_start", run_dir, config, info)

    def on_step(self, step: int) -> None:
        self._each("on_step", step)

    def on_log(self, row: dict[str, Any]) -> None:
        self._each("on_log", row)

    def on_eval(self, row: dict[str, Any]) -> None:
        self._each("on_eval", row)

    def on_end(self, run_dir: Path, final: dict[str, Any]) -> None:
        self._each("on_end", run_dir, final)

    def close(self) -> None:
        for cb in self.callbacks:
            try:
                cb.close()
            except Exception as exc:
                log.warning("%s did not close cleanly: %s", type(cb).__name__, exc)


class ProgressBar(Callback):
    """A tqdm bar of optimizer steps, with the latest loss and learning rate."""

    def __init__(self, total: int, initial: int = 0) -> None:
        from tqdm.auto import tqdm

        self.total = total
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def on_step(self, step: int) -> None:
        self.bar.update(1)

    def on_log(self, row: dict[str, Any]) -> None:
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        if row["step"] >= self.total:
            self.bar.close()

    def close(self) -> None:
        self.bar.close()


class TensorBoard(Callback):
    """TensorBoard event files under ``<run>/tensorboard``."""

    def __init__(self) -> None:
        self.writer: Any = None

    def on_start(self, run_dir: Path, config: dict[str, Any], info: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def on_log(self, row: dict[str, Any]) -> None:
        self.writer.add_scalar("train/loss", row["loss"], row["step"])
        self.writer.add_scalar("train/lr", row["lr"], row["step"])

    def on_eval(self, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if k not in _NOT_METRICS:
                self.writer.add_scalar(f"validation/{k}", v, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
