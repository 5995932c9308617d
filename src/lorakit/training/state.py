"""The training state: everything a run needs to continue exactly where it stopped.

A checkpoint *is* a :class:`TrainState` plus the state of the adapter weights, optimizer, schedule and
gradient scaler; :meth:`TrainState.to_checkpoint` and :meth:`TrainState.from_checkpoint` are the one
place that says what is saved and restored. (The key names are those of checkpoints written before
this class existed, so their runs still resume.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch


@dataclass
class TrainState:
    """Where a run is: progress, data position, the best adapter so far, random generators."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress
    micro: int = 0  # data position: the next micro-batch of `epoch` to train on
    stop: bool = False  # early stopping decided
    history: list[dict[str, Any]] = field(default_factory=list)  # train-loss and validation rows
    best_value: float | None = None  # of train.metric_for_best
    best_at: dict[str, float] = field(default_factory=dict)  # {"step", "epoch"} of the best evaluation
    best_eval: dict[str, Any] = field(default_factory=dict)  # its metrics
    best_state: dict[str, torch.Tensor] | None = None  # its adapter weights (CPU copies)
    evals_without_gain: int = 0
    running_loss: float = 0.0  # loss summed over the examples since the last logged row
    running_n: int = 0
    running_metrics: dict[str, tuple[float, int]] = field(default_factory=dict)  # task metrics: (sum, n)
    run_seconds: float = 0.0  # training time so far, evaluations left out (carried over a resume)
    rng_ranks: list[dict[str, Any]] = field(default_factory=list)  # each process's random generators

    def improved(self, value: float, greater: bool) -> bool:
        """Whether ``value`` beats the best so far."""
        return self.best_value is None or (value > self.best_value if greater else value < self.best_value)

    def to_checkpoint(self, **components: Any) -> dict[str, Any]:
        """The checkpoint payload: this state plus the named component states (weights, optimizer, ...)."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | components

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        """The state part of a checkpoint (checkpoints of single-process runs before data-parallel
        training held one ``rng`` instead of ``rng_ranks``)."""
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in known})
        if not state.rng_ranks and "rng" in saved:
            state.rng_ranks = [saved["rng"]]
        return state

    def summary(self) -> dict[str, Any]:
        """Progress as plain data (no tensors), e.g. for a progress page."""
        return {k: v for k, v in asdict(self).items() if k not in ("best_state", "rng_ranks", "history")}
