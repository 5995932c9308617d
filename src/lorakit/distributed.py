"""Data-parallel training: what `torchrun` / `accelerate launch` start, seen from one process.

Both launchers start N copies of ``lorakit train`` with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT in the environment; :func:`setup` joins them into one process group (NCCL
on GPUs, gloo on CPUs). The training loop then stays the one of a single process, with three rules:

* ``train.batch_size`` is per process: a step sees ``batch_size x processes x accumulation`` examples.
  The global micro-batch is the one a single process with ``batch_size x processes`` would take;
  each rank trains on the rows ``rank::world`` of it, and its loss is weighted by its share of the
  batch's examples (tokens, for language models), so the averaged gradient is the single-process one.
* Evaluation batches are dealt out to the ranks and the outputs gathered back in dataset order: every
  example is scored exactly once, and every rank sees the same metrics (and so makes the same
  best-checkpoint and early-stopping decisions).
* Only rank 0 writes (run folder, logs, checkpoints, adapter, report); a problem it finds while
  preparing the run folder is sent to every rank, so all stop with the same message.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lorakit.errors import LorakitError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (rank 0 of 1 without a launcher)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes artifacts and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """Whether a launcher started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_pref: str) -> tuple[World, torch.device | None]:
    """Join the process group a launcher set up, if any.

    Args:
        device_pref: ``train.device``; ``cpu`` keeps a GPU machine's processes on gloo and the CPU.

    Returns:
        (this process's :class:`World`, the device it must train on, or None to pick as usual).
    """
    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "").lower() in ("1", "true"):
            # Refused rather than silently trained as DDP: the user asked for sharded weights.
            raise LorakitError(f"accelerate config: {name} is not supported by lorakit train yet (it trains with DDP: every process holds the frozen base); "
                               "use an accelerate config with distributed_type MULTI_GPU, or model.quantization: 4bit for a base too large for one GPU")
    if not launched():
        return World(), None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    world = World(dist.get_rank(), dist.get_world_size(), local_rank)
    return world, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def current() -> World:
    """The world of the process group this process is in (a single process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], world: World | None = None) -> list[T]:
    """This rank's share of ``items``: every ``size``-th one from position ``rank``."""
    w = world or current()
    return list(items[w.rank :: w.size])


def gather(obj: T, world: World | None = None) -> list[T]:
    """``obj`` of every rank, in rank order (``[obj]`` for a single process)."""
    w = world or current()
    if not w.distributed:
        return [obj]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the values themselves for a single process)."""
    if not current().distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def on_main(fn: Callable[[], T], world: World) -> T | None:
    """Run ``fn`` on rank 0 only; an exception it raises is raised on every rank.

    Returns:
        ``fn()``'s value on rank 0, None elsewhere.
    """
    if not world.distributed:
        return fn()
    result, error = None, None
    if world.main:
        try:
            result = fn()
        except Exception as e:  # sent to every rank, raised below on each
            error = e
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]
    return result


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """The module the training forward / backward goes through: DDP over the world, or ``model``."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Buffers (position ids, BatchNorm statistics of a trained head) stay per process: with
    # broadcast_buffers the forward would need every rank, and evaluation runs the bare model.
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def sync_buffers(model: torch.nn.Module, world: World) -> None:
    """Give every rank rank 0's buffers (e.g. BatchNorm running statistics), so that evaluation
    on any rank is evaluation of the model rank 0 saves."""
    if not world.distributed:
        return
    for b in model.buffers():
        dist.broadcast(b.data, src=0)
