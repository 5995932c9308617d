"""Output folders that a command fills (an export, an import, a pulled registry version): taken only when
empty or with ``--overwrite``, one message for all of them."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError


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
        LorakitError: (of type ``error``) The folder exists, is not empty, and ``overwrite`` is false.
    """
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        prefix = f"{key}: " if key else ""
        raise error(
            f"{prefix}'{out}' already exists; pass --overwrite to replace it or choose another folder"
        )
    return out
