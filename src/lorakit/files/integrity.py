"""Cheap checks that a weights file or an adapter config is whole, before a library trips over it.

safetensors, transformers and peft report a file cut short (an interrupted copy or download, a full
disk) with their own tracebacks. Reading a safetensors file's header is enough to tell: the header
gives every tensor's byte range, so a file shorter than the last range's end was truncated.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# The header of a safetensors file: an 8-byte little-endian length, then that many bytes of JSON.
_MAX_HEADER = 100 << 20  # safetensors itself refuses larger headers

# The keys a PEFT adapter_config.json needs for peft to rebuild the adapter, per adapter type lorakit
# trains (LoRA, and the LyCORIS methods LoHa and LoKr, whose scaling numerator is `alpha`).
ADAPTER_CONFIG_KEYS = ("peft_type", "r", "lora_alpha", "target_modules")
LYCORIS_CONFIG_KEYS = ("peft_type", "r", "alpha", "target_modules")
PEFT_TYPES = {"LORA": "LoRA", "LOHA": "LoHa", "LOKR": "LoKr"}


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with a safetensors file, judged from its header and size; None when it is whole.

    Args:
        path: The ``.safetensors`` file.

    Returns:
        A short description (``"truncated: 1,024 of 4,096 bytes"``, ``"not a safetensors file ..."``) or None.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, not even a header"
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            return "not a safetensors file (its first bytes are not a header length)"
        raw = fh.read(n)
    if len(raw) < n:
        return f"truncated: {size:,} bytes, inside its {n:,}-byte header"
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "not a safetensors file (its header is not valid JSON)"
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"truncated: {size:,} of {expected:,} bytes"
    return None


def adapter_config_problem(path: str | Path) -> str | None:
    """What is wrong with an ``adapter_config.json``; None when peft can read it.

    Args:
        path: The ``adapter_config.json`` file.

    Returns:
        A short description of the problem (unreadable JSON, not an object, missing keys) or None.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return f"is not valid JSON ({str(exc)[:120]})"
    if not isinstance(data, dict):
        return f"holds a JSON {type(data).__name__}, not an object of PEFT settings"
    kind = data.get("peft_type")
    if "peft_type" in data and kind not in PEFT_TYPES:
        loads = ", ".join(PEFT_TYPES)
        return f"has peft_type {kind!r}; lorakit loads LoRA, LoHa and LoKr adapters (peft_type {loads})"
    keys = ADAPTER_CONFIG_KEYS if kind in (None, "LORA") else LYCORIS_CONFIG_KEYS
    missing = [k for k in keys if k not in data]
    if missing:
        return f"lacks {', '.join(missing)}: it is not a PEFT {PEFT_TYPES.get(kind, 'LoRA')} config"
    return None
