"""`lorakit env`: what a bug report needs to know about the machine a run trains on.

The versions of lorakit and the libraries it stands on, Python and the OS, the CPU (and whether it
multiplies bf16 natively, which decides ``train.mixed_precision: auto``) or the GPUs, torch's threads,
which extras are installed, and the folders lorakit reads and writes outside a run (cache, registry).
"""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters.registry import default_root
from lorakit.files.paths import cache_root
from lorakit.models import modeling

#: The libraries whose versions decide most of what a run does.
LIBRARIES = ("torch", "transformers", "peft", "datasets", "accelerate", "safetensors", "pydantic")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _extras() -> dict[str, list[str]]:
    """Each optional extra of lorakit and the packages of it that are missing (empty: installed)."""
    from packaging.requirements import Requirement

    extras = metadata.metadata("lorakit").get_all("Provides-Extra") or []
    missing: dict[str, list[str]] = {extra: [] for extra in extras}
    for line in metadata.requires("lorakit") or []:
        req = Requirement(line)
        for extra in extras:
            wanted = req.marker is not None and req.marker.evaluate({"extra": extra})
            if wanted and _version(req.name) is None:
                missing[extra].append(req.name)
    return missing


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if found:
            return found.group(1).strip()
    except OSError:
        pass
    return platform.machine()  # (platform.processor() would start `uname -p`)


def _os_name() -> str:
    """Kernel, release and machine, plus the distribution's name where it says one (no subprocess)."""
    u = os.uname()
    try:
        distro = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        distro = ""
    return f"{u.sysname} {u.release} {u.machine}" + (f" ({distro})" if distro else "")


def _cpu() -> dict[str, Any]:
    probe = getattr(torch, "cpu", None)

    def has(name: str) -> bool:
        return bool(getattr(probe, name, lambda: False)())

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "name": _cpu_name(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "avx512_bf16": has("_is_avx512_bf16_supported"),
        "amx": has("_is_amx_tile_supported"),
        "native_bf16": modeling.cpu_has_native_bf16(),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def _gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(
            {
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
            }
        )
    return out


def _precision() -> dict[str, str]:
    """The device `train.device: auto` picks and the precision `mixed_precision: auto` uses there."""
    device = modeling.pick_device("auto")
    amp = modeling.pick_precision("auto", device)
    return {"device": device.type, "mixed_precision_auto": modeling.precision_name(amp)}


def environment_report() -> dict[str, Any]:
    """Everything ``lorakit env`` prints, as plain data (``lorakit env --json`` prints this).

    Returns:
        A mapping of versions, platform, CPU, GPUs, threads, the precision ``auto`` picks, the extras
        (each with the packages it lacks) and lorakit's folders.
    """
    hf_cache = None
    try:
        from huggingface_hub import constants

        hf_cache = str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - a dependency of transformers
        pass
    registry = default_root()
    return {
        "lorakit": _version("lorakit"),
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "os": _os_name(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "cuda": torch.version.cuda or "none (a CPU build of torch)",
        "cpu": _cpu(),
        "gpus": _gpus(),
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "threads": {
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
            **{k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        },
        **_precision(),
        "extras": {
            extra: ("installed" if not lacks else "missing " + ", ".join(lacks))
            for extra, lacks in _extras().items()
        },
        "folders": {
            "cache": str(cache_root()),
            "gguf_cache": str(cache_root() / "gguf")
            + ("" if os.environ.get("LORAKIT_GGUF_CACHE", "1") != "0" else " (off: LORAKIT_GGUF_CACHE=0)"),
            "huggingface_cache": hf_cache,
            "registry": str(registry) + ("" if (registry / "index.sqlite").is_file() else " (none yet)"),
        },
    }


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report as aligned ``key: value`` lines, nested mappings flattened to ``a.b``."""
    flat: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        elif isinstance(value, list) and prefix == "gpus":
            if not value:
                flat.append(("gpus", "none"))
            for i, gpu in enumerate(value):
                flat.append(
                    (f"gpu {i}", f"{gpu['name']}, {gpu['memory_gib']} GiB, capability {gpu['capability']}")
                )
        else:
            flat.append((prefix, "not installed" if value is None else str(value)))

    walk("", report)
    width = max(len(k) for k, _ in flat)
    return [f"{key.ljust(width)}  {value}" for key, value in flat]
