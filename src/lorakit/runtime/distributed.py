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

With an accelerate FSDP config (``ACCELERATE_USE_FSDP``) the model is sharded instead of replicated
(:func:`wrap`: PyTorch's FSDP2 ``fully_shard`` on every transformer block, then on the whole model):
each rank holds 1/N of every weight, and every forward pass is a collective. So evaluation and
generation run the same number of forward passes on every rank (:func:`padding`), and the adapter,
optimizer and best weights are gathered to full tensors (:func:`full_state`) before they are kept
or written.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
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
    #: FSDP: weights are sharded over the ranks and every forward pass needs all of them.
    sharded: bool = False

    @property
    def main(self) -> bool:
        """Whether this process writes artifacts and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


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
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        # Refused rather than silently trained as DDP: the user asked for a sharding engine.
        raise LorakitError(
            "accelerate config: DeepSpeed is not supported by lorakit train; use an accelerate config with "
            "distributed_type FSDP (sharded weights, the same ZeRO-3 idea) or MULTI_GPU (DDP)"
        )
    if not launched():
        return World(), None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30)
        )
    return current(), torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def current() -> World:
    """The world of the process group this process is in (a single process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        # sharded: the launcher's environment asks for FSDP (accelerate's FSDP config)
        return World(
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", "0")),
            _env_flag("ACCELERATE_USE_FSDP"),
        )
    return World()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], world: World | None = None) -> list[T]:
    """This rank's share of ``items``: every ``size``-th one from position ``rank``."""
    w = world or current()
    return list(items[w.rank :: w.size])


def padding(n_items: int, world: World | None = None) -> int:
    """How many extra forward passes this rank runs after its :func:`shard` of ``n_items`` batches:
    under FSDP every forward pass is a collective, so all ranks must run as many (0 otherwise)."""
    w = world or current()
    if not w.sharded or not n_items:
        return 0
    return -(-n_items // w.size) - len(range(w.rank, n_items, w.size))


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
    """The module the training forward / backward goes through: DDP over the world, ``model``
    sharded in place under FSDP, or ``model`` itself for a single process."""
    if not world.distributed:
        return model
    if world.sharded:
        return _fully_shard(model, world, device)
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


def sync_gradients(forward: torch.nn.Module, world: World, sync: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch's forward and backward: gradients are averaged over the ranks only when
    ``sync`` (the last micro-batch before an optimizer step); accumulation steps stay local."""
    if world.sharded:  # FSDP reads the flag in its backward hooks: it stays set until the next call
        forward.set_requires_gradient_sync(sync)  # type: ignore[operator]
        return contextlib.nullcontext()
    return forward.no_sync() if world.distributed and not sync else contextlib.nullcontext()  # type: ignore[operator]


def full_state(model: torch.nn.Module, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """A CPU copy of the entries of ``model.state_dict()`` whose names ``keep`` accepts, as full
    tensors (under FSDP the shards are gathered: a collective every rank must call)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in model.state_dict().items():
        if keep(k):
            full = v.full_tensor() if isinstance(v, DTensor) else v
            out[k] = full.detach().cpu().clone()
    return out


def load_full_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Load full tensors (from :func:`full_state`) into ``model``, sharding them under FSDP.

    Returns:
        The names in ``weights`` that ``model`` has no entry for.
    """
    if not _is_sharded(model):
        return model.load_state_dict(weights, strict=False).unexpected_keys
    unexpected = sorted(set(weights) - set(model.state_dict()))
    if unexpected:
        return unexpected
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    return []


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict[str, Any]:
    """The optimizer's state for a checkpoint: under FSDP gathered to full tensors on rank 0 (a
    collective); otherwise ``optimizer.state_dict()``."""
    if not world.sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return {
        "fsdp_full": get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    }


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], world: World
) -> None:
    """Restore what :func:`optimizer_state` saved (every rank passes the whole checkpoint).

    Raises:
        LorakitError: The checkpoint was written with FSDP and this run is without it, or the reverse.
    """
    if ("fsdp_full" in state) != world.sharded:
        was, now = ("with", "without") if "fsdp_full" in state else ("without", "with")
        raise LorakitError(
            f"--resume: the checkpoint was written {was} FSDP and this run is {now} it; resume "
            "with the launch config the run started with"
        )
    if not world.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=state["fsdp_full"], options=StateDictOptions(full_state_dict=True)
    )


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def block_classes(model: torch.nn.Module) -> list[str]:
    """The class names of the model's repeated blocks (transformers' ``_no_split_modules``)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    return sorted(names & present)


def _fully_shard(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """FSDP2: shard every transformer block, then the rest of the model, over all ranks.

    accelerate's FSDP settings are read from the environment its launcher sets:
    ``fsdp_transformer_layer_cls_to_wrap`` (default: the model's own block classes),
    ``fsdp_reshard_after_forward`` / ``fsdp_sharding_strategy: SHARD_GRAD_OP`` (keep the gathered
    weights from forward to backward: faster, more memory) and ``fsdp_offload_params``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    wanted = [c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
    available = block_classes(model)
    present = {type(m).__name__ for m in model.modules()}
    missing = [c for c in wanted if c not in present]
    if missing:
        no_blocks = "no value (this model has no transformer blocks: it is sharded as a whole)"
        raise LorakitError(
            f"accelerate config: fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, "
            f"which this model does not have; use {', '.join(available) or no_blocks}"
        )
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "").upper()
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    keep_gathered = reshard in ("false", "0", "no") or strategy in ("SHARD_GRAD_OP", "2")
    offload: OffloadPolicy = (
        CPUOffloadPolicy() if _env_flag("FSDP_OFFLOAD_PARAMS") and device.type == "cuda" else OffloadPolicy()
    )
    mesh = init_device_mesh(device.type, (world.size,))
    blocks = set(wanted or available)
    for m in list(model.modules()):
        if m is not model and type(m).__name__ in blocks:
            fully_shard(m, mesh=mesh, reshard_after_forward=not keep_gathered, offload_policy=offload)
    fully_shard(model, mesh=mesh, reshard_after_forward=not keep_gathered, offload_policy=offload)
    units = (
        f"{', '.join(sorted(blocks))} blocks one by one, then the rest of the model"
        if blocks
        else "the model as one unit"
    )
    logging.getLogger("lorakit").info(
        "weights sharded with FSDP over %d processes: %s%s",
        world.size,
        units,
        "; gathered weights kept from forward to backward" if keep_gathered else "",
    )
    if hasattr(model, "generate"):
        # generate() calls the inner model's forward, not the root's: gather the root's weights around it.
        register_fsdp_forward_method(model, "generate")
    return model
