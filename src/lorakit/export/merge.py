"""`lorakit export`: fold an adapter into its base model, optionally to ONNX, and prove the result.

The flow::

    adapter dir ─► base + adapter (unmerged) ─► logits on check batches  (the reference)
                └► merge_and_unload ─► save (HF safetensors) ─► reload like a user ─► same logits?
                                                           └► ONNX ─► onnxruntime ─► same logits?

The check batches come from the task (texts of different lengths, images, chat prompts) and have
different shapes, so dynamic axes in the ONNX graph are exercised too. Everything is written into a
temporary folder that replaces the output folder only when every check passed.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters.build import LoadedAdapter, load_adapter
from lorakit.export.common import (
    ExportError,
    adapter_name,
    in_float64,
    logits_of,
    max_diff,
    provenance,
    worst_diff,
    write_provenance,
)
from lorakit.files.atomic import atomic_dir
from lorakit.files.diskspace import no_space_is_an_error
from lorakit.files.outputs import check_output_folder

#: Largest |unmerged - merged| logit difference accepted for fp32 models.
FP32_TOLERANCE = 1e-4
ONNX_FILE = "model.onnx"


@dataclass
class ExportResult:
    out_dir: Path
    merged_diff: float  # largest |unmerged - merged (reloaded from disk)| over the check batches, in float64
    merged_diff_fp32: float  # the same, both run in float32
    fp32_noise: float  # largest |unmerged float32 - unmerged float64|: float32 arithmetic alone
    onnx_path: Path | None
    onnx_diff: float | None  # largest |unmerged - onnxruntime|
    tolerance: float
    checked: int  # number of check inputs (rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "merged_max_abs_diff": self.merged_diff,
            "merged_max_abs_diff_fp32": self.merged_diff_fp32,
            "fp32_noise": self.fp32_noise,
            "onnx": str(self.onnx_path) if self.onnx_path else None,
            "onnx_max_abs_diff": self.onnx_diff,
            "tolerance": self.tolerance,
            "checked_inputs": self.checked,
        }


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _onnx_export(
    model: torch.nn.Module, example: dict[str, torch.Tensor], path: Path, axes: dict[int, str]
) -> None:
    """Export with the dynamo exporter (the TorchScript
    one mis-traces attention masks of new transformers)."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError(
            "--onnx needs onnx, onnxscript and onnxruntime: pip install 'lorakit[onnx]'"
        ) from None
    from torch.export import Dim

    dims: dict[str, Any] = {}
    shapes = {
        k: {i: dims.setdefault(n, Dim(n)) for i, n in axes.items() if i < v.dim()} for k, v in example.items()
    }
    for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    with warnings.catch_warnings(), open("/dev/null", "w") as devnull, contextlib.redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (),
                str(path),
                kwargs=example,
                input_names=list(example),
                output_names=["logits"],
                dynamic_shapes=shapes,
                dynamo=True,
                verbose=False,
                external_data=False,
            )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(
                f"ONNX export of this {getattr(model.config, 'model_type', 'model')} failed "
                f"({first[:200]}); export without --onnx"
            ) from None


def _onnx_check(path: Path, batches: list[dict[str, torch.Tensor]], reference: list[torch.Tensor]) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    worst = 0.0
    for batch, want in zip(batches, reference, strict=True):
        out = session.run(["logits"], {k: v.numpy() for k, v in batch.items() if k in names})[0]
        worst = max(worst, max_diff(torch.from_numpy(out), want, batch))
    return worst


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


@dataclass
class _Reference:
    """The unmerged adapter's logits on the task's check batches, in float32 and float64."""

    batches: list[dict[str, torch.Tensor]]
    fp32: list[torch.Tensor]
    fp64: list[torch.Tensor]
    noise: float  # largest |float32 - float64|: what float32 arithmetic alone moves
    checked: int  # rows over all batches


def export(
    adapter: str | Path,
    out_dir: str | Path,
    *,
    onnx: bool = False,
    overwrite: bool = False,
    base_model: str | None = None,
    tolerance: float = FP32_TOLERANCE,
) -> ExportResult:
    """Merge an adapter into its base model and save it in Hugging Face format (and ONNX), verified.

    Args:
        adapter: Adapter directory or run directory.
        out_dir: Folder to write; replaced atomically once every check passed.
        onnx: Also write ``model.onnx`` (classification tasks) and check it with onnxruntime.
        overwrite: Replace an existing non-empty ``out_dir``.
        base_model: Load this base model instead of the recorded one (same content hash).
        tolerance: Largest accepted absolute logit difference (fp32 default 1e-4).

    Returns:
        Where the export went and the measured differences.

    Raises:
        ExportError: Output folder taken, task without ONNX support, quantised adapter, or a check
            found a difference above ``tolerance`` (nothing is written then).
        AdapterError: The adapter cannot be loaded.
    """
    out = check_output_folder(out_dir, overwrite=overwrite, error=ExportError)
    loaded: LoadedAdapter = load_adapter(adapter, base_model=base_model, device="cpu")
    _check_mergeable(loaded, out, onnx=onnx)
    reference = _unmerged_reference(loaded)
    # peft folds B @ A * scaling into each target weight and swaps the trained heads (modules_to_save) in.
    merged = loaded.model.merge_and_unload()
    merged.eval()
    kept = f"'{out}' was left as it was; free some space and export again"
    with no_space_is_an_error("the merged model", out, kept), atomic_dir(out) as tmp:
        loaded.task.save_merged(merged, tmp, loaded)
        # Check what a user gets: the saved folder, reloaded by plain transformers (or the zoo loader).
        reloaded = loaded.task.load_merged(tmp, loaded)
        result = _check_reloaded(reloaded, out, reference, tolerance)
        if onnx:
            result.onnx_diff = _write_onnx_checked(reloaded, loaded, tmp, reference, tolerance)
            result.onnx_path = out / ONNX_FILE
        _write_provenance_and_card(loaded, tmp, result, onnx=onnx)
    return result


def _check_mergeable(loaded: LoadedAdapter, out: Path, *, onnx: bool) -> None:
    """Refuse, before any work, what cannot be exported exactly.

    Raises:
        ExportError: ``out`` holds the adapter, the base was quantised, or ONNX for a task without it.
    """
    task, meta = loaded.task, loaded.meta
    if out.resolve() in (loaded.adapter_dir.resolve(), *loaded.adapter_dir.resolve().parents):
        raise ExportError(f"'{out}' holds the adapter being exported; choose another output folder")
    quant = meta.get("config", {}).get("model", {}).get("quantization", "none")
    if quant not in (None, "none"):
        raise ExportError(
            f"this adapter was trained on a {quant}-quantised base; merging into quantised weights is "
            "not exact — export with --base-model pointing at the unquantised model"
        )
    if onnx and task.onnx_axes is None:
        raise ExportError(
            f"--onnx: ONNX export is for the classification tasks; export this {task.name} adapter "
            "without --onnx (Hugging Face format)"
        )


def _unmerged_reference(loaded: LoadedAdapter) -> _Reference:
    """The unmerged model's logits on the check batches, in float32 and float64.

    The check runs in float64: the merge itself is exact algebra, while float32 arithmetic alone moves
    the logits of a 30-layer LM by ~1e-4 (adding the update to W, or not, changes roundings). float64
    isolates the merge error; the float32 numbers are reported beside it.
    """
    batches = loaded.task.export_batches(loaded.processor, loaded.config.data)
    checked = sum(len(next(iter(b.values()))) for b in batches)
    ref32 = [logits_of(loaded.model, b) for b in batches]
    ref64 = [logits_of(loaded.model.double(), in_float64(b)) for b in batches]
    loaded.model.float()  # float32 -> float64 -> float32 is lossless
    return _Reference(batches, ref32, ref64, worst_diff(ref32, ref64, batches), checked)


def _check_reloaded(reloaded: torch.nn.Module, out: Path, ref: _Reference, tolerance: float) -> ExportResult:
    """The merged model as saved and reloaded against the unmerged reference, in float64 and float32.

    Raises:
        ExportError: The reloaded model's logits differ from the unmerged ones by more than ``tolerance``.
    """
    diff32 = worst_diff([logits_of(reloaded, b) for b in ref.batches], ref.fp32, ref.batches)
    merged_diff = worst_diff(
        [logits_of(reloaded.double(), in_float64(b)) for b in ref.batches], ref.fp64, ref.batches
    )
    reloaded.float()
    if not merged_diff <= tolerance:  # also catches NaN
        raise ExportError(
            f"merge check failed: largest |unmerged - merged| logit difference is {merged_diff:.3g} "
            f"> {tolerance:g} (float64); nothing was written"
        )
    return ExportResult(out, merged_diff, diff32, ref.noise, None, None, tolerance, ref.checked)


def _write_onnx_checked(
    reloaded: torch.nn.Module, loaded: LoadedAdapter, tmp: Path, ref: _Reference, tolerance: float
) -> float:
    """Export the reloaded model to ONNX and run it with onnxruntime; its largest logit difference.

    Raises:
        ExportError: The ONNX export failed or its logits differ by more than ``tolerance``.
    """
    axes = loaded.task.onnx_axes
    assert axes is not None  # checked by _check_mergeable
    _onnx_export(reloaded, ref.batches[0], tmp / ONNX_FILE, axes)
    onnx_diff = _onnx_check(tmp / ONNX_FILE, ref.batches, ref.fp32)
    if not onnx_diff <= tolerance:
        raise ExportError(
            "ONNX check failed: largest |unmerged - onnxruntime| logit difference is "
            f"{onnx_diff:.3g} > {tolerance:g}; nothing was written"
        )
    return onnx_diff


def _write_provenance_and_card(loaded: LoadedAdapter, tmp: Path, result: ExportResult, *, onnx: bool) -> None:
    """``lorakit-export.json`` (what was merged and what the checks measured) and the model card."""
    from lorakit.adapters.card import merged_card

    verification = result.to_dict() | {"out_dir": None, "onnx": ONNX_FILE if onnx else None}
    record = provenance("merged", {adapter_name(loaded): loaded}, verification)
    write_provenance(tmp, record)
    (tmp / "README.md").write_text(
        merged_card(loaded.meta, record, zoo_format=not (tmp / "config.json").is_file()), encoding="utf-8"
    )
