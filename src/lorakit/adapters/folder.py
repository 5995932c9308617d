"""The adapter folder: the contract between stages, written and read here alone.

An adapter directory is the standard PEFT layout (``adapter_config.json`` +
``adapter_model.safetensors``, loadable by plain ``peft.PeftModel.from_pretrained``) plus
``lorakit.json`` (task, label space, base model and its hash, resolved config, metrics, versions)
and a model card ``README.md``. Every artifact is written to a temporary path and renamed into
place, so an interrupted run never leaves something that looks finished.

``lorakit.json`` has one owner, this module, whichever route made the folder (``lorakit train``,
``lorakit import``; ``registry pull`` copies it byte for byte)::

    build_metadata(config, peft LoraConfig, base, data, parameters, metrics, trained | imported)
        ─► write_metadata(folder, meta)          validated, atomic
    read_metadata(folder) ─► meta                format and required keys checked, one-line errors

Its keys, in this order::

    format        "lorakit-adapter/2" (METADATA_FORMAT); "lorakit-adapter/1" files, and files without it, read
    task          the lorakit task name
    base_model    name_or_path, resolved, revision, model_type, fingerprint (content hash)
    label_space   {"id2label": {...}} or null
    data          sizes (examples per split), stats (what preparing the data counted)
    lora          method (lora | loha | lokr; absent = lora), r, alpha, dropout, target_modules,
                  modules_to_save, layers, use_rslora, use_dora, effective_conv2d, rank_pattern,
                  alpha_pattern: from the peft config, as peft resolved it, sorted
    parameters    trainable, total (modeling.count_parameters of the model as trained)
    config        the resolved run config
    versions      lorakit, torch, transformers, peft, datasets
    created_at    ISO 8601, UTC
    metrics       {split: {metric: value}}
    trained       (train) step and epoch of the weights saved      | one of the two
    imported      (import) the source folder and what peft recorded |
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import AdapterError
from lorakit.files.atomic import atomic_dir, now_iso, write_json_atomic
from lorakit.files.integrity import adapter_config_problem, safetensors_problem

if TYPE_CHECKING:
    from lorakit.config.schema import RunConfig
    from lorakit.data.labels import LabelSpace

METADATA_FILE = "lorakit.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

#: ``lorakit.json``'s schema version (its ``format`` key). Version 1 had the same keys except that only
#: imported adapters recorded ``lora.rank_pattern`` / ``lora.alpha_pattern`` (and an import wrote the
#: target modules unsorted). Version 1 files are read as they are, and so is a file without ``format``
#: (written by hand or by another tool): the keys of METADATA_KEYS are what is needed.
METADATA_FORMAT = "lorakit-adapter/2"
READABLE_FORMATS = ("lorakit-adapter/1", METADATA_FORMAT)
#: What every later stage reads from lorakit.json (``base_model.name_or_path`` too).
METADATA_KEYS = ("task", "base_model")
#: peft's adapter types (``adapter_config.json``'s ``peft_type``) -> ``lora.method``.
METHODS = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}


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
        write_metadata(tmp, metadata)
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


def other_base(expected: str | None, found: str | None) -> bool:
    """Whether two base-model fingerprints (``lorakit.json``'s ``base_model.fingerprint``, or
    :func:`lorakit.models.modeling.model_fingerprint` of a loaded base) name different models.

    A missing or ``"unknown"`` side (a Hub model never hashed, an imported adapter) proves nothing: only
    two known fingerprints that differ count.
    """
    known = {expected, found} - {None, "", "unknown"}
    return len(known) == 2


# --------------------------------------------------------------------------------------------------
# lorakit.json
# --------------------------------------------------------------------------------------------------


def lora_record(lora: Any) -> dict[str, Any]:
    """``lorakit.json``'s ``lora`` block from the peft ``LoraConfig`` the adapter was made with.

    The values are peft's, as it resolved them (the target module names, the heads it added to
    ``modules_to_save``), not the run config's request; lists are sorted and de-duplicated, so an adapter
    trained here and the same adapter imported from its peft files get the same block.
    """
    targets, layers = lora.target_modules, lora.layers_to_transform
    method = METHODS.get(str(getattr(lora.peft_type, "value", lora.peft_type)), "lora")
    return {
        "method": method,
        "r": lora.r,
        "alpha": lora.lora_alpha if method == "lora" else lora.alpha,
        "dropout": getattr(lora, "lora_dropout", 0.0),
        "target_modules": targets if targets is None or isinstance(targets, str) else sorted(targets),
        "modules_to_save": sorted(set(lora.modules_to_save or [])),
        "layers": [layers] if isinstance(layers, int) else (list(layers) if layers is not None else None),
        "use_rslora": bool(getattr(lora, "use_rslora", False)),
        "use_dora": bool(getattr(lora, "use_dora", False)),
        "effective_conv2d": bool(getattr(lora, "use_effective_conv2d", False)),
        "rank_pattern": dict(lora.rank_pattern or {}),
        "alpha_pattern": dict(lora.alpha_pattern or {}),
    }


def adapter_method(meta: dict[str, Any]) -> str:
    """The adapter's ``lora.method`` (``lora``, ``loha``, ``lokr``); older metadata, without it, is LoRA."""
    return str((meta.get("lora") or {}).get("method", "lora"))


def build_metadata(
    config: RunConfig,
    lora: Any,
    *,
    resolved: str,
    model_type: str | None,
    fingerprint: str,
    label_space: LabelSpace | None,
    data_sizes: dict[str, int],
    data_stats: dict[str, Any],
    parameters: tuple[int, int],
    metrics: dict[str, Any],
    trained: dict[str, Any] | None = None,
    imported: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The contents of ``lorakit.json`` (its keys: see the module docstring), for every route.

    Args:
        config: The resolved run config (of an import: the one :mod:`~lorakit.adapters.importing` makes).
        lora: The peft ``LoraConfig`` of the adapter (``peft_model.peft_config["default"]``).
        resolved: Where the base model was loaded from.
        model_type: The base config's ``model_type``.
        fingerprint: The base model's content hash (:func:`lorakit.models.modeling.model_fingerprint`).
        label_space: The classes, for the tasks that have them.
        data_sizes: Examples per split (empty for an import: the data is unknown).
        data_stats: What preparing the data counted (empty for an import).
        parameters: ``(trainable, total)`` as :func:`lorakit.models.modeling.count_parameters` counts
            them on the model as trained.
        metrics: ``{split: {metric: value}}`` of the saved weights.
        trained: Training only: the step and epoch of the saved weights.
        imported: Import only: the source folder and what peft recorded.

    Returns:
        The metadata, ready for :func:`write_metadata`.
    """
    trainable, total = parameters
    meta: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "task": config.task,
        "base_model": {
            "name_or_path": config.model.name_or_path,
            "resolved": resolved,
            "revision": config.model.revision,
            "model_type": model_type,
            "fingerprint": fingerprint,
        },
        "label_space": label_space.to_dict() if label_space else None,
        "data": {"sizes": data_sizes, "stats": data_stats},
        "lora": lora_record(lora),
        "parameters": {"trainable": trainable, "total": total},
        "config": config.to_yaml_dict(),
        "versions": library_versions(),
        "created_at": now_iso(),
        "metrics": metrics,
    }
    if trained is not None:
        meta["trained"] = trained
    if imported is not None:
        meta["imported"] = imported
    return meta


def _metadata_problem(meta: Any) -> str | None:
    """What makes ``meta`` unusable as ``lorakit.json``, with the fix (words to follow the file name), or
    None."""
    damaged = (
        "the adapter's lorakit metadata is damaged (edited by hand?): copy the adapter again, or retrain"
    )
    if not isinstance(meta, dict):
        return f"lacks {', '.join(METADATA_KEYS)}; {damaged}"
    fmt = meta.get("format")
    if fmt is not None and fmt not in READABLE_FORMATS:
        return (
            f"has format {fmt!r}, which this lorakit does not read (it reads {', '.join(READABLE_FORMATS)}): "
            "written by a newer lorakit? upgrade lorakit, or retrain"
        )
    missing = [k for k in METADATA_KEYS if k not in meta]
    if not missing and not (isinstance(meta["base_model"], dict) and meta["base_model"].get("name_or_path")):
        missing = ["base_model.name_or_path"]
    return f"lacks {', '.join(missing)}; {damaged}" if missing else None


def write_metadata(folder: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``lorakit.json`` into an adapter folder, atomically.

    Args:
        folder: The adapter folder (or the temporary folder that will become it).
        meta: The metadata :func:`build_metadata` made.

    Returns:
        The file written.

    Raises:
        AdapterError: ``meta`` is not metadata this module would read back (nothing is written then).
    """
    path = Path(folder) / METADATA_FILE
    if meta.get("format") != METADATA_FORMAT or _metadata_problem(meta):
        # a bug, not a user's mistake: only build_metadata's output is written
        raise AdapterError(
            f"'{path}' not written: the metadata is not of format {METADATA_FORMAT} with "
            f"{', '.join(METADATA_KEYS)} (built without build_metadata?)"
        )
    write_json_atomic(path, meta)
    return path


def read_metadata(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's ``lorakit.json`` (task, labels, base model, config, metrics), checked.

    Args:
        adapter_dir: An adapter directory or a run directory holding ``adapter/``.

    Returns:
        The metadata, as written (a file of format 1, or of none, is returned as it is).

    Raises:
        AdapterError: The folder is not a complete adapter, or its metadata is unreadable, of a format
            this lorakit does not know, or lacks keys.
    """
    adapter_dir = find_adapter_dir(adapter_dir)
    path = adapter_dir / METADATA_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"'{path}' is not valid JSON ({exc}); the adapter directory is damaged") from None
    problem = _metadata_problem(meta)
    if problem:
        raise AdapterError(f"'{path}' {problem}")
    return meta
