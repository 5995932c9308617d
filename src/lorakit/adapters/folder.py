"""The adapter folder: the contract between stages, written and read here alone.

An adapter directory is the standard PEFT layout (``adapter_config.json`` +
``adapter_model.safetensors``, loadable by plain ``peft.PeftModel.from_pretrained``) plus
``lorakit.json`` (task, label space, base model and its hash, resolved config, metrics, versions)
and a model card ``README.md``. Every artifact is written to a temporary path and renamed into
place, so an interrupted run never leaves something that looks finished.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from lorakit.errors import AdapterError
from lorakit.files.atomic import atomic_dir
from lorakit.files.integrity import adapter_config_problem, safetensors_problem

METADATA_FILE = "lorakit.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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
    from lorakit.files.diskspace import no_space_is_an_error
    from lorakit.models.modeling import mutated_base_warnings_off

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


def other_base(expected: str | None, found: str | None) -> bool:
    """Whether two base-model fingerprints (``lorakit.json``'s ``base_model.fingerprint``, or
    :func:`lorakit.models.modeling.model_fingerprint` of a loaded base) name different models.

    A missing or ``"unknown"`` side (a Hub model never hashed, an imported adapter) proves nothing: only
    two known fingerprints that differ count.
    """
    known = {expected, found} - {None, "", "unknown"}
    return len(known) == 2


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
