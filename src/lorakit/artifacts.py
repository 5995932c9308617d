"""Adapter directories and run directories: the contract between stages.

An adapter directory is the standard PEFT layout (``adapter_config.json`` +
``adapter_model.safetensors``, loadable by plain ``peft.PeftModel.from_pretrained``) plus
``lorakit.json`` (task, label space, base model and its hash, resolved config, metrics, versions)
and a model card ``README.md``. Every artifact is written to a temporary path and renamed into
place, so an interrupted run never leaves something that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from lorakit.errors import AdapterError, RunDirError
from lorakit.integrity import adapter_config_problem, safetensors_problem

METADATA_FILE = "lorakit.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_UMASK = os.umask(0)
os.umask(_UMASK)


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in (nearly) one rename.

    An existing ``target`` is moved aside first and removed only after the new one is in place.
    On failure the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Adapter directory
# --------------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    out = {}
    for pkg in ("lorakit", "torch", "transformers", "peft", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def save_adapter(
    peft_model: Any,
    target: str | Path,
    metadata: dict[str, Any],
    *,
    card: str,
    initial: Path | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Save a peft model's adapter with lorakit metadata and a model card, atomically.

    Args:
        peft_model: The ``PeftModel`` being trained.
        target: The adapter directory to (re)place.
        metadata: Contents of ``lorakit.json``.
        card: Markdown text of the model card ``README.md``.
        initial: The adapter as PiSSA / OLoRA initialised it (saved before training): the saved
            adapter is then converted to plain LoRA that applies to the unmodified base model.
        state_dict: The weights to save instead of ``peft_model.state_dict()`` (full tensors of a
            model sharded with FSDP).

    Returns:
        The adapter directory.
    """
    from lorakit.diskspace import no_space_is_an_error
    from lorakit.modeling import mutated_base_warnings_off

    kept = "nothing was replaced (a previous adapter there is intact); free some space and try again"
    with no_space_is_an_error("the adapter", target, kept), atomic_dir(target) as tmp:
        with mutated_base_warnings_off():
            peft_model.save_pretrained(
                str(tmp),
                safe_serialization=True,
                # the trained adapter only (a task may hold others, e.g. a frozen reference adapter)
                selected_adapters=["default"],
                path_initial_model_for_weight_conversion=str(initial) if initial else None,
                **({"state_dict": state_dict} if state_dict is not None else {}),
            )
        if initial is not None:
            _restore_saved_modules(peft_model, tmp / ADAPTER_WEIGHTS)
        # peft writes its own README.md stub; ours replaces it.
        (tmp / "README.md").write_text(card, encoding="utf-8")
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n", encoding="utf-8")
    return Path(target)


def _restore_saved_modules(peft_model: Any, weights: Path) -> None:
    """peft's PiSSA / OLoRA -> LoRA conversion keeps only the lora_A / lora_B tensors (peft 0.21);
    the modules trained in full (the task head, norms: ``modules_to_save``) go back into the file."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    converted = load_file(str(weights))
    dropped = {
        k: v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(peft_model).items()
        if k not in converted
    }
    if dropped:
        save_file({**dropped, **converted}, str(weights), metadata={"format": "pt"})


def find_adapter_dir(path: str | Path) -> Path:
    """Accept a run directory (with ``adapter/``) or an adapter directory; return the adapter directory.

    Raises:
        AdapterError: Neither layout is found.
    """
    p = Path(path)
    if not p.exists():
        raise AdapterError(f"'{p}' does not exist; pass a run directory or an adapter directory")
    for candidate in (p, p / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            if not (candidate / ADAPTER_WEIGHTS).is_file():
                if (candidate / "adapter_model.bin").is_file():
                    raise AdapterError(
                        f"'{candidate}' holds pickled adapter_model.bin weights; lorakit loads only "
                        "safetensors (re-save with safe_serialization=True)"
                    )
                raise AdapterError(
                    f"'{candidate}' has no {ADAPTER_WEIGHTS}: the adapter is incomplete "
                    "(an interrupted save?)"
                )
            if not (candidate / METADATA_FILE).is_file():
                raise AdapterError(
                    f"'{candidate}' has no {METADATA_FILE}; it was not written by lorakit, so its "
                    "task and labels are unknown"
                )
            _check_adapter_files(candidate)
            return candidate
    raise AdapterError(
        f"'{p}' is neither an adapter directory nor a run directory with adapter/ inside; pass "
        "the folder `lorakit train` wrote"
    )


def _check_adapter_files(adapter_dir: Path) -> None:
    """Each way an adapter's PEFT files can be broken gets its own message (not a peft traceback)."""
    problem = adapter_config_problem(adapter_dir / ADAPTER_CONFIG)
    if problem:
        raise AdapterError(
            f"'{adapter_dir / ADAPTER_CONFIG}' {problem}; the adapter folder is damaged: copy it "
            "again from where it came from, or retrain"
        )
    problem = safetensors_problem(adapter_dir / ADAPTER_WEIGHTS)
    if problem:
        raise AdapterError(
            f"'{adapter_dir / ADAPTER_WEIGHTS}' is damaged ({problem}): an interrupted copy or a "
            "full disk? copy the adapter again, or retrain"
        )


METADATA_KEYS = ("task", "base_model")  # what every later stage reads from lorakit.json


def read_metadata(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's ``lorakit.json`` (task, labels, base model, config, metrics).

    Args:
        adapter_dir: An adapter directory or a run directory holding ``adapter/``.

    Returns:
        The metadata.

    Raises:
        AdapterError: The folder is not a complete adapter, or its metadata is unreadable or lacks keys.
    """
    adapter_dir = find_adapter_dir(adapter_dir)
    path = adapter_dir / METADATA_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"'{path}' is not valid JSON ({exc}); the adapter directory is damaged") from None
    missing = [k for k in METADATA_KEYS if k not in meta] if isinstance(meta, dict) else list(METADATA_KEYS)
    if not missing and not (isinstance(meta["base_model"], dict) and meta["base_model"].get("name_or_path")):
        missing = ["base_model.name_or_path"]
    if missing:
        raise AdapterError(
            f"'{path}' lacks {', '.join(missing)}; the adapter's lorakit metadata is damaged "
            "(edited by hand?): copy the adapter again, or retrain"
        )
    return meta
