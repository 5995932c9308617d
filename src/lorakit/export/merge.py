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
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters.build import LoadedAdapter, load_adapter
from lorakit.errors import LorakitError
from lorakit.files.atomic import atomic_dir, now_iso
from lorakit.files.diskspace import no_space_is_an_error

#: Largest |unmerged - merged| logit difference accepted for fp32 models.
FP32_TOLERANCE = 1e-4
EXPORT_METADATA = "lorakit-export.json"
ONNX_FILE = "model.onnx"


class ExportError(LorakitError):
    """An export cannot be made or did not reproduce the adapter's outputs."""


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


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _max_diff(got: torch.Tensor, want: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference, over real (non-padding) positions for per-token outputs."""
    diff = (got.double() - want.double()).abs()
    if diff.dim() == 3 and "attention_mask" in batch:
        diff = diff[batch["attention_mask"].bool()]
    return float(diff.max()) if diff.numel() else 0.0


def _worst(
    got: list[torch.Tensor], want: list[torch.Tensor], batches: list[dict[str, torch.Tensor]]
) -> float:
    return max(_max_diff(g, w, b) for g, w, b in zip(got, want, batches, strict=True))


def _f64(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating inputs (pixels) in float64; ids and masks unchanged."""
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


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
        worst = max(worst, _max_diff(torch.from_numpy(out), want, batch))
    return worst


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


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
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"'{out}' already exists; pass --overwrite to replace it or choose another folder")
    loaded: LoadedAdapter = load_adapter(adapter, base_model=base_model, device="cpu")
    if out.resolve() in (loaded.adapter_dir.resolve(), *loaded.adapter_dir.resolve().parents):
        raise ExportError(f"'{out}' holds the adapter being exported; choose another output folder")
    task, meta = loaded.task, loaded.meta
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
    data_cfg = loaded.config.data

    # ---- reference outputs of the unmerged model ------------------------------------------------
    # The check runs in float64: the merge itself is exact algebra, while float32 arithmetic alone
    # moves the logits of a 30-layer LM by ~1e-4 (adding the update to W, or not, changes roundings).
    # float64 isolates the merge error; the float32 numbers are reported beside it.
    batches = task.export_batches(loaded.processor, data_cfg)
    checked = sum(len(next(iter(b.values()))) for b in batches)
    ref32 = [_logits(loaded.model, b) for b in batches]
    ref64 = [_logits(loaded.model.double(), _f64(b)) for b in batches]
    loaded.model.float()  # float32 -> float64 -> float32 is lossless
    noise = _worst(ref32, ref64, batches)

    # peft folds B @ A * scaling into each target weight and swaps the trained heads (modules_to_save) in.
    merged = loaded.model.merge_and_unload()
    merged.eval()

    with (
        no_space_is_an_error(
            "the merged model", out, f"'{out}' was left as it was; free some space and export again"
        ),
        atomic_dir(out) as tmp,
    ):
        task.save_merged(merged, tmp, loaded)
        # Check what a user gets: the saved folder, reloaded by plain transformers (or the zoo loader).
        reloaded = task.load_merged(tmp, loaded)
        diff32 = _worst([_logits(reloaded, b) for b in batches], ref32, batches)
        merged_diff = _worst([_logits(reloaded.double(), _f64(b)) for b in batches], ref64, batches)
        reloaded.float()
        if not merged_diff <= tolerance:  # also catches NaN
            raise ExportError(
                f"merge check failed: largest |unmerged - merged| logit difference is {merged_diff:.3g} "
                f"> {tolerance:g} (float64); nothing was written"
            )
        onnx_path = onnx_diff = None
        if onnx:
            assert task.onnx_axes is not None  # checked above
            _onnx_export(reloaded, batches[0], tmp / ONNX_FILE, task.onnx_axes)
            onnx_diff = _onnx_check(tmp / ONNX_FILE, batches, ref32)
            if not onnx_diff <= tolerance:
                raise ExportError(
                    "ONNX check failed: largest |unmerged - onnxruntime| logit difference is "
                    f"{onnx_diff:.3g} > {tolerance:g}; nothing was written"
                )
            onnx_path = out / ONNX_FILE
        result = ExportResult(out, merged_diff, diff32, noise, onnx_path, onnx_diff, tolerance, checked)
        from lorakit.adapters.card import merged_card
        from lorakit.files.hashing import hash_tree

        provenance = {
            "format": 1,
            "kind": "merged",
            "task": meta["task"],
            "created_at": now_iso(),
            "adapter": {
                "path": str(loaded.adapter_dir.resolve()),
                "content_hash": hash_tree(loaded.adapter_dir)[0],
            },
            "base_model": meta["base_model"],
            "label_space": meta.get("label_space"),
            "metrics": meta.get("metrics", {}),
            "verification": result.to_dict() | {"out_dir": None, "onnx": ONNX_FILE if onnx else None},
        }
        (tmp / EXPORT_METADATA).write_text(
            json.dumps(provenance, indent=2, default=str) + "\n", encoding="utf-8"
        )
        (tmp / "README.md").write_text(
            merged_card(meta, provenance, zoo_format=not (tmp / "config.json").is_file()), encoding="utf-8"
        )
    return result
