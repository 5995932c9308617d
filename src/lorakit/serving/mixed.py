"""Gathered LoRA for mixed-adapter batches: two batched matmuls per layer instead of one small
matmul chain per adapter.

peft runs a batch whose rows use different adapters by looping over the adapters present: for each,
index its rows, ``B(A(x)) * scaling``, add back. With 32 rows for 32 adapters that is 32 tiny chains
per layer, and the per-op overhead dominates on CPUs. Here, per layer and batch::

    A_u = stack(A of the adapters present)            [U, r, in]
    B_u = stack(B * scaling of the same)              [U, out, r]
    out = bmm(bmm(x, A_u[row]ᵀ), B_u[row]ᵀ)            [rows, tokens, out]   (row -> its adapter)

(the gather-then-bmm scheme of S-LoRA / Punica's BGMV, in plain torch). Rows for the bare base model
(``__base__``) get no update. Adapters with other ranks in the same batch, DoRA and other variants
fall back to peft's own loop, so results never change, only speed.
"""

from __future__ import annotations

import types
from typing import Any

import torch


def _gathered_mixed_forward(self: Any, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    present = [n for n in dict.fromkeys(adapter_names) if n in self.lora_A]
    shapes = {tuple(self.lora_A[n].weight.shape) for n in present}
    if len(shapes) > 1 or any(n in self.lora_variant for n in present) or x.dim() not in (2, 3):
        return type(self)._mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
    result = self.base_layer(x, *args, **{k: v for k, v in kwargs.items() if k not in VARIANT_KWARG_KEYS})
    if not present:
        return result
    slot = {n: i for i, n in enumerate(present)}
    rows = torch.tensor([slot.get(n, -1) for n in adapter_names], device=x.device)
    keep = rows >= 0
    a = torch.stack([self.lora_A[n].weight for n in present])  # [U, r, in]
    b = torch.stack([self.lora_B[n].weight * self.scaling[n] for n in present])  # [U, out, r]
    xs = x if bool(keep.all()) else x[keep]
    flat = xs.dim() == 2
    if flat:
        xs = xs.unsqueeze(1)
    idx = rows[keep]
    out = torch.bmm(torch.bmm(xs.to(a.dtype), a[idx].transpose(1, 2)), b[idx].transpose(1, 2))
    if flat:
        out = out.squeeze(1)
    if bool(keep.all()):
        result += out.to(result.dtype)
    else:
        result[keep] += out.to(result.dtype)
    return result


def install(model: torch.nn.Module) -> int:
    """Give every LoRA ``Linear`` of ``model`` the gathered mixed-batch forward; returns how many."""
    from peft.tuners.lora.layer import Linear

    n = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module._mixed_batch_forward = types.MethodType(_gathered_mixed_forward, module)
            n += 1
    return n
