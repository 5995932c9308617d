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

STORE = "_lorakit_store"  # on each LoRA Linear: adapter name -> (A [r, in], B * scaling [out, r])


class Rows(list):
    """Per-row adapter names, plus what every layer needs of them, computed once per batch."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.unique = [n for n in dict.fromkeys(names) if n != "__base__"]
        slot = {n: i for i, n in enumerate(self.unique)}
        self.slots = [slot.get(n, -1) for n in names]
        self.index = torch.tensor(self.slots)
        self.keep = self.index >= 0
        self.every = bool(self.keep.all())
        self.kept = self.index[self.keep]


def _weights(layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B * scaling) of an adapter in a layer: from the light store, or from peft's modules (cached)."""
    stored = layer.__dict__.get(STORE)
    if stored is not None and name in stored:
        return stored[name]
    if name not in layer.lora_A:
        return None
    cache = layer.__dict__.setdefault("_lorakit_scaled", {})
    if name not in cache:
        cache[name] = (layer.lora_A[name].weight, layer.lora_B[name].weight * layer.scaling[name])
    return cache[name]


def _lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-row LoRA update: rows of ``x`` times their adapter's ``A`` then ``B`` (stacked [U, ...])."""
    flat = x.dim() == 2
    xs = x.unsqueeze(1) if flat else x
    out = torch.bmm(torch.bmm(xs, a[idx].transpose(1, 2)), b[idx].transpose(1, 2))
    return out.squeeze(1) if flat else out


def _gathered_mixed_forward(
    self: Any, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
) -> torch.Tensor:
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    rows = adapter_names if isinstance(adapter_names, Rows) else Rows(adapter_names)
    weights = [_weights(self, n) for n in rows.unique]
    if any(n in self.lora_variant for n in rows.unique) or x.dim() not in (2, 3):
        return type(self)._mixed_batch_forward(self, x, *args, adapter_names=list(adapter_names), **kwargs)
    result = self.base_layer(x, *args, **{k: v for k, v in kwargs.items() if k not in VARIANT_KWARG_KEYS})
    if all(w is not None for w in weights) and len({w[0].shape for w in weights}) == 1:
        # The common case: every adapter of the batch in this layer, one rank: two bmm for all rows.
        if rows.every:
            # One gather per row straight into the batched operands, and B's product added in place.
            a = torch.stack([weights[u][0] for u in rows.slots]).to(x.dtype)  # [rows, r, in]
            b = torch.stack([weights[u][1] for u in rows.slots]).to(result.dtype)  # [rows, out, r]
            xs, out = (x.unsqueeze(1), result.unsqueeze(1)) if x.dim() == 2 else (x, result)
            out.baddbmm_(torch.bmm(xs, a.transpose(1, 2)).to(result.dtype), b.transpose(1, 2))
        elif rows.kept.numel():
            a = torch.stack([w[0] for w in weights]).to(x.dtype)  # [U, r, in]
            b = torch.stack([w[1] for w in weights]).to(x.dtype)  # [U, out, r]
            result[rows.keep] += _lora(x[rows.keep], a, b, rows.kept).to(result.dtype)
        return result
    # Otherwise one group per rank; adapters without this layer add nothing here.
    groups: dict[tuple[int, ...], list[int]] = {}
    for u, w in enumerate(weights):
        if w is not None:
            groups.setdefault(tuple(w[0].shape), []).append(u)
    for members in groups.values():
        local = torch.full((len(rows.unique) + 1,), -1, dtype=torch.long)
        local[torch.tensor(members)] = torch.arange(len(members))
        idx = local[rows.index]  # base rows (-1) map to the extra slot, i.e. -1
        keep = idx >= 0
        a = torch.stack([weights[u][0] for u in members]).to(x.dtype)
        b = torch.stack([weights[u][1] for u in members]).to(x.dtype)
        result[keep] += _lora(x[keep], a, b, idx[keep]).to(result.dtype)
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
        for m in self.layers.values():
            m.__dict__["_lorakit_layer"] = True
        self.heads = {n: m for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
        install(self.model)

    def fits(self, folder: Path) -> bool:
        """Whether the adapter in ``folder`` is plain LoRA on layers (and heads) the model already has."""
        mixable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
        if any(not isinstance(w.original_module, mixable) for w in self.heads.values()):
            return False  # peft cannot mix such heads per row; these adapters go through peft (one pass each)
        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        if (
            cfg.get("peft_type") != "LORA"
            or cfg.get("use_dora")
            or cfg.get("lora_bias")
            or cfg.get("rank_pattern")
            or cfg.get("alpha_pattern")
        ):
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
                layer.__dict__.setdefault(STORE, {})[name] = (a.to(dtype), (b * scaling).to(dtype))
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
            layer.__dict__.get(STORE, {}).pop(name, None)
            layer.__dict__.get("_lorakit_scaled", {}).pop(name, None)
        for wrapper in self.heads.values():
            if name in wrapper.modules_to_save:
                del wrapper.modules_to_save[name]
        self.names.discard(name)

    @contextlib.contextmanager
    def rows(self, names: list[str]) -> Iterator[None]:
        """Run the model with one adapter per batch row: every LoRA layer and head gets the names."""
        plan = Rows(names)  # heads get the plain list; LoRA layers the precomputed plan

        def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, "adapter_names": plan if module.__dict__.get("_lorakit_layer") else names}

        handles = [
            m.register_forward_pre_hook(hook, with_kwargs=True)
            for m in [*self.layers.values(), *self.heads.values()]
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
