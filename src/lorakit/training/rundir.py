"""Who may use a run directory, and what ``--resume`` finds there.

Two small decisions that every training recipe makes before it writes anything:

- :func:`resume_state`: ``--resume`` means "continue my run"; when there is nothing to continue, the
  user hears so (one line, exit 2) instead of a silent fresh start. ``--resume-or-start`` (the Python
  API's ``resume="auto"``) is the explicit "continue if you can, else start", for restart loops.
- :class:`RunLock`: one ``lorakit train`` at a time per run directory. The lock is an OS file lock
  (``flock``) on the folder itself: the kernel drops it when the process ends, however it ends, so a
  crashed or killed run never leaves the folder locked, and no lock file is left behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

from lorakit.errors import RunDirError
from lorakit.training import checkpoint

Resume = bool | Literal["auto"]


def resume_state(run: Path, resume: Resume) -> dict[str, Any] | None:
    """The checkpoint a run continues from, or None for a fresh start.

    Args:
        run: The run directory (``output.dir``).
        resume: False (start fresh), True (continue; refuse when there is nothing to continue) or
            ``"auto"`` (continue when there is a checkpoint, start fresh otherwise).

    Returns:
        The newest complete checkpoint's state, or None when the run starts from the beginning.

    Raises:
        RunDirError: ``resume`` is set but the run already finished, or (``resume=True``) there is
            no checkpoint to continue from.
    """
    if not resume:
        return None
    state = checkpoint.load_latest(run)
    if state is not None:
        return state
    if (run / "metrics.json").is_file():
        raise RunDirError(
            f"--resume: the run in '{run}' already finished; nothing to resume (use --overwrite to "
            "train again)"
        )
    if resume == "auto":
        return None
    if not run.is_dir() or not any(run.iterdir()):
        raise RunDirError(
            f"--resume: no run to resume in '{run}'; leave out --resume to start it, or pass "
            "--resume-or-start to continue when possible and start otherwise"
        )
    raise RunDirError(
        f"--resume: '{run}' has no checkpoint yet (the run stopped before its first one); start "
        "again with --overwrite, or pass --resume-or-start"
    )


class RunLock:
    """An exclusive, non-blocking OS lock on a run directory, held for the whole run.

    Args:
        run: The run directory; it must exist when :meth:`acquire` is called.
    """

    def __init__(self, run: Path) -> None:
        self.run = Path(run)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or refuse at once when another process holds it.

        Raises:
            RunDirError: Another ``lorakit train`` is writing into this folder.
        """
        try:
            import fcntl
        except ImportError:  # not on POSIX (Windows): no lock, as before
            return
        fd = os.open(self.run, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(
                f"output.dir: '{self.run}' is in use by another lorakit train that is still "
                "running; wait for it to end, or choose another output.dir"
            ) from None
        self._fd = fd

    def __del__(self) -> None:  # a run that failed before its cleanup still lets go of the folder
        self.release()

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it); safe to call when not held."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def prepare_run_dir(path: str | Path, *, overwrite: bool) -> Path:
    """Create the run directory, refusing to clobber a previous run unless ``overwrite``.

    Raises:
        RunDirError: The directory holds a run and ``overwrite`` is false, or it cannot be written.
    """
    run = Path(path)
    if run.exists() and not run.is_dir():
        raise RunDirError(f"output.dir: '{run}' is a file; choose a folder path")
    if run.exists() and any(run.iterdir()) and not overwrite:
        raise RunDirError(
            f"output.dir: '{run}' already holds a run; pass --overwrite to replace it or "
            "choose another output.dir"
        )
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".write-test-{uuid.uuid4().hex[:6]}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(
            f"output.dir: cannot write to '{run}' ({exc.strerror}); choose a writable folder"
        ) from None
    return run


def clear_run_dir(run: Path) -> None:
    """Remove the artifacts of a previous run (used with --overwrite) before training starts."""
    for child in run.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
