"""Many adapters in one model: gathered LoRA for mixed-adapter batches, and a light adapter store.

**Gathered LoRA.** peft runs a batch whose rows use different adapters by looping over the adapters
present: for each, index its rows, ``B(A(x)) * scaling``, add back. With 32 rows for 32 adapters that
is 32 tiny matmul chains per layer, and per-op overhead dominates on CPUs. Here, per layer::

    A_u = stack(A of the adapters present)            [U, r, in]
    B_u = stack(B * scaling of the same)              [U, out, r]
    out = bmm(bmm(x, A_u[row]ᵀ), B_u[row]ᵀ)            [rows, tokens, out]   (row -> its adapter)

(the gather-then-bmm scheme of S-LoRA / Punica's BGMV, in plain torch), one group per rank when
ranks differ. Rows of the bare base model (``__base__``) get no update; DoRA and other variants go
to peft's own loop.

**Light store.** peft keeps every adapter as modules inside every LoRA layer, and each
``load_adapter`` walks all modules of the model, so loading N adapters costs O(N²) (measured: 80
MiniLM adapters took 110 s). Adapters whose layers the model already has (same targets as one loaded
through peft) are instead kept as plain tensors on each layer, plus a copy of each trained head in
peft's ``ModulesToSaveWrapper`` (which batches heads per row itself). Loading one is reading its
safetensors file. They are only ever run through the row hooks below (mixed-batch path), which give
each layer and head the per-row adapter names, as peft's own ``adapter_names`` argument does.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

STORE = "_lorakit_store"  # on each LoRA Linear: adapter name -> (A [r, in], B [out, r], scaling)


def _weights(layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    return getattr(layer, STORE, {}).get(name)


def _gathered_mixed_forward(self: Any, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    present = [n for n in dict.fromkeys(adapter_names) if n != "__base__" and _weights(self, n) is not None]
    if any(n in self.lora_variant for n in present) or x.dim() not in (2, 3):
        return type(self)._mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
    result = self.base_layer(x, *args, **{k: v for k, v in kwargs.items() if k not in VARIANT_KWARG_KEYS})
    groups: dict[tuple[int, ...], list[str]] = {}
    for n in present:
        groups.setdefault(tuple(_weights(self, n)[0].shape), []).append(n)
    for members in groups.values():
        slot = {n: i for i, n in enumerate(members)}
        rows = torch.tensor([slot.get(n, -1) for n in adapter_names], device=x.device)
        keep = rows >= 0
        every = bool(keep.all())
        w = [_weights(self, n) for n in members]
        # Stored in half precision or not, the LoRA product is computed in the activations' precision.
        a = torch.stack([wa for wa, _, _ in w]).to(x.dtype)  # [U, r, in]
        b = torch.stack([wb.to(x.dtype) * s for _, wb, s in w])  # [U, out, r]
        xs = x if every else x[keep]
        flat = xs.dim() == 2
        if flat:
            xs = xs.unsqueeze(1)
        idx = rows[keep]
        out = torch.bmm(torch.bmm(xs, a[idx].transpose(1, 2)), b[idx].transpose(1, 2))
        if flat:
            out = out.squeeze(1)
        if every:
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


class AdapterStore:
    """Adapters held as plain tensors in the LoRA layers a peft-loaded adapter created (see module doc)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.names: set[str] = set()
        self.refresh()

    def refresh(self) -> None:
        """Re-read the model's LoRA layers and head wrappers (after peft added layers)."""
        from peft.tuners.lora.layer import Linear
        from peft.utils.other import ModulesToSaveWrapper

        self.layers = {n: m for n, m in self.model.named_modules() if isinstance(m, Linear)}
        self.heads = {n: m for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
        install(self.model)

    def fits(self, folder: Path) -> bool:
        """Whether the adapter in ``folder`` is plain LoRA on layers (and heads) the model already has."""
        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("lora_bias") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            return False
        from safetensors import safe_open

        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
            keys = list(fh.keys())
        for key in keys:
            if ".lora_A.weight" in key or ".lora_B.weight" in key:
                if key.rsplit(".lora_", 1)[0] not in self.layers:
                    return False
            elif not any(key.startswith(h + ".") for h in self.heads):
                return False
        return True

    def add(self, folder: Path, name: str, *, dtype: torch.dtype, device: torch.device) -> None:
        from safetensors.torch import load_file

        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        r, alpha = cfg["r"], cfg["lora_alpha"]
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        tensors = load_file(str(folder / "adapter_model.safetensors"), device=str(device))
        for layer_name, layer in self.layers.items():
            a = tensors.get(f"{layer_name}.lora_A.weight")
            if a is not None:
                b = tensors[f"{layer_name}.lora_B.weight"]
                layer.__dict__.setdefault(STORE, {})[name] = (a.to(dtype), b.to(dtype), scaling)
        for head_name, wrapper in self.heads.items():
            prefix = head_name + "."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                head = copy.deepcopy(wrapper.original_module)
                head.load_state_dict(state)
                wrapper.modules_to_save[name] = head.eval()
        self.names.add(name)

    def remove(self, name: str) -> None:
        for layer in self.layers.values():
            getattr(layer, STORE, {}).pop(name, None)
        for wrapper in self.heads.values():
            if name in wrapper.modules_to_save:
                del wrapper.modules_to_save[name]
        self.names.discard(name)

    @contextlib.contextmanager
    def rows(self, names: list[str]) -> Iterator[None]:
        """Run the model with one adapter per batch row: every LoRA layer and head gets the names."""
        def hook(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, "adapter_names": names}

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in [*self.layers.values(), *self.heads.values()]]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
