"""Process memory: keep resident memory from creeping up over a run."""

from __future__ import annotations

from typing import Any

MMAP_THRESHOLD = 8 << 20
M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3


def _glibc() -> Any | None:
    """The C library when it is glibc (whose allocator the settings below tune), else None."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory(threshold: int = MMAP_THRESHOLD, arenas: int | None = None) -> bool:
    """Fix glibc malloc's mmap threshold so that large freed tensors return to the system.

    glibc raises the threshold each time a large block is freed (up to 32 MiB), after which tensors
    are carved from the heap; batches of changing shapes then fragment it and the resident memory
    grows run-long. A fixed threshold keeps large tensors in their own mappings. ``arenas`` caps
    glibc's per-thread arenas (a server's worker threads each grow one otherwise). Returns whether
    it was set (only on glibc).
    """
    libc = _glibc()
    if libc is None:
        return False
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    if arenas is not None:
        done = bool(libc.mallopt(M_ARENA_MAX, arenas)) and done
    return done


def trim_heap() -> bool:
    """Give the free pages inside glibc's heaps back to the system (``malloc_trim``).

    A long-lived server frees batches of every shape; the holes they leave stay resident until trimmed.
    Cheap (about a millisecond); call it when idle. Returns whether anything was released.
    """
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
