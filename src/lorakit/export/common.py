"""What the exporters share: their error type, the arithmetic of their checks, and the provenance file.

Every export folder (``--merge``, ``--gguf``, ``--vllm``) gets ``lorakit-export.json``, written by
:func:`write_provenance` and read back by :func:`read_provenance`::

    format        2 (EXPORT_FORMAT); format 1 files (merged and GGUF exports of one adapter) are read too
    kind          "merged", "gguf" or "vllm"
    task          the adapters' task
    created_at    ISO 8601, UTC
    base_model    the adapters' lorakit.json base_model (name, resolved path, content hash ...)
    label_space   the classes, or null
    adapters      {name: {path, content_hash (files.hashing.hash_tree of the adapter folder), metrics}}
    verification  what the exporter checked and measured (its own keys per kind)

The checks compare logits of the unmerged adapter with those of what was written, in float64 where the
merge is exact algebra (float32 rounding alone moves a deep model's logits by ~1e-4).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorakit.errors import LorakitError
from lorakit.files.atomic import now_iso, write_json_atomic
from lorakit.files.hashing import hash_tree

if TYPE_CHECKING:
    from lorakit.adapters.build import LoadedAdapter

EXPORT_METADATA = "lorakit-export.json"
#: Version 2 names every adapter under ``adapters`` (a vLLM export holds several); version 1 had one
#: ``adapter`` {path, content_hash} and its ``metrics`` at the top.
EXPORT_FORMAT = 2
READABLE_EXPORT_FORMATS = (1, EXPORT_FORMAT)
PROVENANCE_KEYS = ("kind", "task", "created_at", "base_model", "adapters", "verification")


class ExportError(LorakitError):
    """An export cannot be made or did not reproduce the adapter's outputs."""


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for one batch, without gradients."""
    with torch.no_grad():
        return model(**batch).logits


def max_diff(got: torch.Tensor, want: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference, over real (non-padding) positions for per-token outputs."""
    diff = (got.double() - want.double()).abs()
    if diff.dim() == 3 and "attention_mask" in batch:
        diff = diff[batch["attention_mask"].bool()]
    return float(diff.max()) if diff.numel() else 0.0


def worst_diff(
    got: list[torch.Tensor], want: list[torch.Tensor], batches: list[dict[str, torch.Tensor]]
) -> float:
    """:func:`max_diff` over every check batch."""
    return max(max_diff(g, w, b) for g, w, b in zip(got, want, batches, strict=True))


def in_float64(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating inputs (pixels) in float64; ids and masks unchanged."""
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# Provenance: lorakit-export.json
# --------------------------------------------------------------------------------------------------


def adapter_name(loaded: LoadedAdapter) -> str:
    """The name an adapter goes by in an export: its run folder's (``RUN/adapter``), else its own."""
    folder = loaded.adapter_dir
    return folder.parent.name if folder.name == "adapter" else folder.name


def provenance(
    kind: str, adapters: Mapping[str, LoadedAdapter], verification: dict[str, Any]
) -> dict[str, Any]:
    """The contents of ``lorakit-export.json`` (keys: see the module docstring).

    Args:
        kind: ``merged``, ``gguf`` or ``vllm``.
        adapters: The exported adapters by name, on one base model (the first one's base is recorded).
        verification: What the exporter checked and measured.

    Returns:
        The provenance, ready for :func:`write_provenance`.
    """
    first = next(iter(adapters.values())).meta
    return {
        "format": EXPORT_FORMAT,
        "kind": kind,
        "task": first["task"],
        "created_at": now_iso(),
        "base_model": first["base_model"],
        "label_space": first.get("label_space"),
        "adapters": {
            name: {
                "path": str(a.adapter_dir.resolve()),
                "content_hash": hash_tree(a.adapter_dir)[0],
                "metrics": a.meta.get("metrics", {}),
            }
            for name, a in adapters.items()
        },
        "verification": verification,
    }


def write_provenance(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write ``lorakit-export.json`` into an export folder (or the temporary folder that becomes it).

    Returns:
        The file written.
    """
    path = Path(folder) / EXPORT_METADATA
    write_json_atomic(path, record)
    return path


def read_provenance(folder: str | Path) -> dict[str, Any]:
    """The ``lorakit-export.json`` of an export folder, checked (a format 1 file is returned in the
    format 2 layout).

    Raises:
        ExportError: No such file, not JSON, a format this lorakit does not read, or keys missing.
    """
    path = Path(folder) / EXPORT_METADATA
    if not path.is_file():
        raise ExportError(f"'{folder}' has no {EXPORT_METADATA}; pass a folder `lorakit export` wrote")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"'{path}' is not valid JSON ({exc}); export again") from None
    fmt = record.get("format") if isinstance(record, dict) else None
    if fmt not in READABLE_EXPORT_FORMATS:
        raise ExportError(
            f"'{path}' has format {fmt!r}, which this lorakit does not read (it reads "
            f"{', '.join(map(str, READABLE_EXPORT_FORMATS))}): upgrade lorakit, or export again"
        )
    if fmt == 1:
        record = _from_format_1(record)
    missing = [k for k in PROVENANCE_KEYS if k not in record]
    if missing:
        raise ExportError(f"'{path}' lacks {', '.join(missing)}; it is damaged: export again")
    return record


def _from_format_1(record: dict[str, Any]) -> dict[str, Any]:
    """A format 1 record (one ``adapter`` and its ``metrics`` at the top) in the format 2 layout."""
    record = dict(record)
    adapter, metrics = record.pop("adapter", None), record.pop("metrics", {})
    if isinstance(adapter, dict) and adapter.get("path"):
        folder = Path(adapter["path"])
        name = folder.parent.name if folder.name == "adapter" else folder.name
        record["adapters"] = {name: adapter | {"metrics": metrics}}
    record.setdefault("label_space", None)
    return record
