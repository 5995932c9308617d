"""The optimizer side of a run: seeding, AdamW parameter groups, the schedule and the step count."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

from lorakit.config.schema import TrainConfig


def set_seed(seed: int) -> None:
    """Seed every generator initialisation, dropout and data order draw from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def optimizer_steps(n_train: int, t: TrainConfig, processes: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps in the whole run) for ``n_train`` examples."""
    per_epoch = math.ceil(math.ceil(n_train / (t.batch_size * processes)) / t.gradient_accumulation_steps)
    return per_epoch, t.max_steps or max(1, math.ceil(t.epochs * per_epoch))


def param_groups(model: torch.nn.Module, t: TrainConfig, head_modules: list[str]) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases / norms; optional own learning rates for the head and
    (LoRA+) the B matrices."""
    groups: dict[tuple[bool, bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name.lower()
        is_head = any(f".{h}." in f".{name}" for h in head_modules) and "lora_" not in name
        is_b = ".lora_B." in name or ".lora_embedding_B." in name
        groups.setdefault((no_decay, is_head, is_b), []).append(p)
    out = []
    for (no_decay, is_head, is_b), params in groups.items():
        lr = t.head_learning_rate if (is_head and t.head_learning_rate) else t.learning_rate
        if is_b and t.lora_plus_ratio:
            lr *= t.lora_plus_ratio
        out.append({"params": params, "weight_decay": 0.0 if no_decay else t.weight_decay, "lr": lr})
    return out


def make_optimizer(
    model: torch.nn.Module,
    t: TrainConfig,
    head_modules: list[str],
    total_steps: int,
    *,
    device: torch.device,
    amp: torch.dtype | None,
    sharded: bool,
) -> tuple[Any, Any, Any]:
    """(AdamW, learning-rate schedule, gradient scaler) for a run of ``total_steps`` optimizer steps.

    The scaler only scales under fp16 autocast; under FSDP its inf checks agree across the ranks'
    gradient shards.
    """
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(
        param_groups(model, t, head_modules), lr=t.learning_rate, betas=t.adam_betas
    )
    scheduler = get_scheduler(
        t.scheduler,
        optimizer,
        num_warmup_steps=round(t.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return optimizer, scheduler, ShardedGradScaler(device.type, enabled=amp == torch.float16)
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
