"""`lorakit train`: the recipe (:mod:`.recipe`), its state (:mod:`.state`), events (:mod:`.events`),
optimizer (:mod:`.optim`) and memory settings (:mod:`.memory`)."""

from lorakit.training.events import Callback
from lorakit.training.memory import release_freed_memory
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
