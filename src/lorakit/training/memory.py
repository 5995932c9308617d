"""Process memory: keep resident memory from creeping up over a run."""

from __future__ import annotations

MMAP_THRESHOLD = 8 << 20


def release_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc malloc's mmap threshold so that large freed tensors return to the system.

    glibc raises the threshold each time a large block is freed (up to 32 MiB), after which tensors
    are carved from the heap; batches of changing shapes then fragment it and the resident memory
    grows run-long. A fixed threshold keeps large tensors in their own mappings. Returns whether it
    was set (only on glibc).
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
