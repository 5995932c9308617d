"""Output folders that a command fills (an export, an import, a pulled registry version): taken only when
empty or with ``--overwrite``, one message for all of them, and by one process at a time.

Two commands filling the same folder at once (two `lorakit export --out X`) would both pass the empty-
folder check and then replace each other's work, or fail in the final rename. :func:`check_output_folder`
therefore takes an exclusive, non-blocking OS lock (``flock`` on ``.<name>.lock`` beside the folder) and
holds it until :func:`lorakit.files.atomic.atomic_dir` has renamed the finished folder into place (or the
process ends: the kernel drops the lock however it ends); the second command is refused at once, before
it loads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.errors import LorakitError

#: Output folders this process holds the lock of: path -> the locked file descriptor.
_HELD: dict[Path, int] = {}


def _claim(out: Path, error: type[LorakitError], prefix: str) -> None:
    """Take the lock of ``out`` for this process (again: a no-op), or refuse when another holds it."""
    key = out.absolute()
    if key in _HELD:
        return
    try:
        import fcntl
    except ImportError:  # not on POSIX (Windows): no lock
        return
    key.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key.parent / f".{key.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise error(
            f"{prefix}'{out}' is being written by another lorakit command that is still running; wait "
            "for it to end, or choose another folder"
        ) from None
    _HELD[key] = fd


def release_output_folder(path: str | Path) -> None:
    """Let go of the lock :func:`check_output_folder` took on ``path`` (safe when none is held)."""
    fd = _HELD.pop(Path(path).absolute(), None)
    if fd is not None:
        os.close(fd)


def check_output_folder(
    path: str | Path, *, overwrite: bool, key: str = "", error: type[LorakitError] = LorakitError
) -> Path:
    """``path`` as a folder the caller may fill: missing, empty, or ``overwrite`` given.

    Args:
        path: The output folder.
        overwrite: The user passed ``--overwrite``: an existing folder will be replaced (atomically,
            by the caller).
        key: The option that named it (``--out``), put before the message.
        error: The exception type of the calling stage.

    Raises:
        LorakitError: (of type ``error``) The folder exists, is not empty, and ``overwrite`` is false;
            or another lorakit command is filling it now.
    """
    out = Path(path)
    prefix = f"{key}: " if key else ""
    _claim(out, error, prefix)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        release_output_folder(out)
        raise error(
            f"{prefix}'{out}' already exists; pass --overwrite to replace it or choose another folder"
        )
    return out
