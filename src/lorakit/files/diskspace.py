"""A full disk while an artifact is written: one line that says what was kept, not an OSError traceback.

Every artifact is written under a temporary name and renamed into place (see :mod:`lorakit.adapters.folder`),
so a write that fails for lack of space leaves the previous checkpoint, adapter, export or registry
version as it was; :func:`no_space_is_an_error` only has to say so.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from lorakit.errors import DiskFullError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk or the user's quota is full (an OSError, or SQLite's own message)."""
    if isinstance(exc, OSError):
        return exc.errno in NO_SPACE
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc)


@contextlib.contextmanager
def no_space_is_an_error(what: str, where: str | Path, kept: str) -> Iterator[None]:
    """Turn "no space left on device" inside the block into a one-line :class:`DiskFullError`.

    Args:
        what: What was being written (``"a checkpoint"``).
        where: The path it was written to.
        kept: What is still intact and how to go on (``"the previous checkpoint is kept; ..."``).

    Raises:
        DiskFullError: The block failed for lack of space; other errors pass through unchanged.
    """
    try:
        yield
    except (OSError, sqlite3.OperationalError) as exc:
        if not is_no_space(exc):
            raise
        raise DiskFullError(
            f"no space left on the device while writing {what} to '{where}'; {kept}"
        ) from None
