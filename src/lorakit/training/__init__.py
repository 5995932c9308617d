"""`lorakit train`: the recipe (:mod:`.recipe`), its state (:mod:`.state`), events (:mod:`.events`),
optimizer (:mod:`.optim`), checkpoints (:mod:`.checkpoint`), run folders (:mod:`.rundir`), trackers
(:mod:`.tracking`) and `lorakit check` (:mod:`.preflight`).

May import: the layers up to ``evaluation`` (the final report)."""

from lorakit.runtime.memory import release_freed_memory
from lorakit.training.events import Callback
from lorakit.training.optim import optimizer_steps, param_groups, set_seed
from lorakit.training.recipe import Recipe, TrainingError, TrainResult, train
from lorakit.training.state import TrainState

__all__ = [
    "Callback",
    "Recipe",
    "TrainResult",
    "TrainState",
    "TrainingError",
    "optimizer_steps",
    "param_groups",
    "release_freed_memory",
    "set_seed",
    "train",
]
