"""Training checkpoints for exact resume: trainable weights, optimizer, schedule, RNG, data position.

Each checkpoint is a folder ``<run>/checkpoints/step-<N>`` written under a temporary name and renamed
into place, so a kill at any moment leaves either a complete checkpoint or none. Resume takes the
newest complete one. Loading uses ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.files.diskspace import no_space_is_an_error

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    """Every random generator training draws from (dropout, data order, init)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run: Path, step: int, state: dict[str, Any], *, keep: int = 1) -> Path:
    """Write ``state`` as checkpoint ``step`` and drop all but the newest ``keep`` checkpoints."""
    root = run / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{uuid.uuid4().hex[:8]}"
    kept = "the previous checkpoint is kept: free some space and continue with `lorakit train --resume`"
    with no_space_is_an_error("a checkpoint", final, kept):
        try:
            tmp.mkdir()
            torch.save(state, tmp / STATE_FILE)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
            raise
    if final.exists():  # the same step saved twice (e.g. after an evaluation): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    for old in complete(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):  # left by a kill during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    return final


def complete(run: Path) -> list[Path]:
    """Complete checkpoints of ``run``, oldest first."""
    root = run / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def load_latest(run: Path) -> dict[str, Any] | None:
    """The newest complete checkpoint's state, or None when the run has none."""
    found = complete(run)
    if not found:
        return None
    return torch.load(found[-1] / STATE_FILE, weights_only=True)


def remove_all(run: Path) -> None:
    shutil.rmtree(run / CHECKPOINTS, ignore_errors=True)
