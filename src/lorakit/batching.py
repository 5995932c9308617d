"""Batch order: length-grouped, seeded and reproducible per epoch.

Grouping examples of similar length means dynamic padding wastes little compute. Order is a pure
function of (seed, epoch), so a resumed run can skip to exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def train_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int, group_by_length: bool, megabatch: int = 64) -> list[list[int]]:
    """Index batches for one training epoch.

    With ``group_by_length`` the shuffled indices are cut into mega-batches of ``megabatch`` batches,
    each sorted by length and cut into batches; the batch order is then shuffled again so that
    lengths do not trend through the epoch.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    if not group_by_length:
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    size = batch_size * megabatch
    batches: list[list[int]] = []
    for start in range(0, len(perm), size):
        mega = sorted(perm[start : start + size], key=lambda i: -lengths[i])
        batches.extend(mega[i : i + batch_size] for i in range(0, len(mega), batch_size))
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Deterministic batches for evaluation, sorted by length (results are put back in order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
