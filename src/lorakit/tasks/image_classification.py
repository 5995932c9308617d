"""Image classification: one label per image, on a transformers vision model or a zoo backbone.

Rows keep the image *reference* (path, URL or encoded bytes); decoding, augmentation and
normalisation happen per batch in the collate function, so nothing is materialised and training
images are augmented afresh each epoch. Unreadable images are found once, before training (skipped
and counted, or an error when too many are bad), so an epoch never stops on a broken file.
"""

from __future__ import annotations

import glob
import inspect
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from pydantic import Field

from lorakit.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig
from lorakit.data.batching import column_values
from lorakit.data.images import IDX_ROWS, AugmentConfig, BadImage, ImageSpec, ImageTransforms, load_image
from lorakit.data.labels import LabelSpace
from lorakit.data.sources import build_splits
from lorakit.errors import DataError, ModelError
from lorakit.files.paths import resolve_location
from lorakit.models import zoo
from lorakit.models.modeling import load_base_config, new_module_names, quiet_transformers
from lorakit.tasks.base import PreparedData
from lorakit.tasks.classification import ClassificationTask

log = logging.getLogger("lorakit")


class ImageClassificationData(DataConfig):
    """Images with one label each."""

    image_column: str = Field(
        "image",
        description="Column with the image (a path relative to the data file, an http(s) URL, "
        "or image bytes from a Hub dataset).",
    )
    label_column: str = Field("label", description="Column with the label (strings or integers).")
    image_size: int | None = Field(
        None,
        ge=16,
        le=1024,
        description="Side of the square model input in pixels; unset = the size the model's "
        "image processor names.",
    )
    crop_pct: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Evaluation: the share of the resized image the center crop keeps; unset = the model "
        "processor's (1.0 when it names none). Use 1.0 for images whose object fills the frame.",
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="Training-time augmentation of images."
    )
    max_bad_images: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Share of unreadable images that are skipped (and counted in the log) "
        "before the run stops with an error.",
    )


def _source_dir(location: str | None) -> Path | None:
    """The folder relative image paths in a data file are read from: the data file's own folder."""
    if not location:
        return None
    try:
        files = sorted(glob.glob(str(Path(resolve_location(location)).expanduser())))
    except Exception:
        return None
    return Path(files[0]).resolve().parent if files and Path(files[0]).is_file() else None


def check_images(
    ds: Dataset,
    column: str,
    *,
    base_dir: Path | None,
    max_bad: float,
    key: str,
    notes: list[str] | None = None,
) -> Dataset:
    """Decode every image once; drop the unreadable ones (a line for the run log goes to ``notes``)
    or stop when more than ``max_bad`` of them are bad. Relative paths become absolute. Rows read from
    idx files (``images.IDX_ROWS``) are PNGs lorakit wrote itself and are returned unchecked.

    Raises:
        DataError: Too many bad images (the first reason is named).
    """
    if ds.info.description == IDX_ROWS:  # PNGs lorakit just wrote from valid pixels
        return ds
    values = column_values(ds, column)
    fixed: list[Any] = []
    bad: list[tuple[int, str]] = []
    for i, v in enumerate(values):
        if (
            isinstance(v, str)
            and base_dir is not None
            and not v.startswith(("http://", "https://"))
            and not Path(v).expanduser().is_absolute()
        ):
            v = str(base_dir / v)
        try:
            load_image(v)
        except BadImage as exc:
            bad.append((i, str(exc)))
        fixed.append(v)
    if bad:
        share = len(bad) / max(1, len(values))
        if share > max_bad:
            raise DataError(
                f"{key}: {len(bad)} of {len(values)} images ({share:.1%}) cannot be read, first at row "
                f"{bad[0][0]}: {bad[0][1]}; fix or remove them, or raise data.max_bad_images (now {max_bad})"
            )
        note = (
            f"{key}: skipped {len(bad)} unreadable image(s) of {len(values)}, e.g. row "
            f"{bad[0][0]}: {bad[0][1]}"
        )
        if notes is None:
            log.warning(note)
        else:
            notes.append(note)
    if any(isinstance(v, str) for v in fixed[:1]):
        ds = ds.remove_columns(column).add_column(column, fixed)
    if bad:
        dropped = {i for i, _ in bad}
        ds = ds.select([i for i in range(len(ds)) if i not in dropped])
    return ds


class ImageClassificationTrain(TrainConfig):
    """Optimisation and evaluation schedule of an image classifier."""

    release_memory: bool = Field(
        False,
        description=TrainConfig.model_fields["release_memory"].description
        + " Images: false by default, because every batch has the same shape, so the heap does not "
        "creep and reusing it makes steps faster.",
    )


class ImageClassification(ClassificationTask):
    name = "image-classification"
    data_config = ImageClassificationData
    train_config = ImageClassificationTrain
    peft_task_type = None  # peft has no image task type: the plain PeftModel wraps it
    try_widget = "image-labels"
    input_description = "Images: base64-encoded bytes (a data: URL too) or http(s) URLs."

    def decode_inputs(self, items: list[str]) -> list[Any]:
        """Base64 strings (or data: URLs) become image bytes; http(s) URLs stay URLs."""
        import base64
        import binascii

        out: list[Any] = []
        for i, item in enumerate(items):
            if item.startswith(("http://", "https://")):
                out.append(item)
                continue
            try:
                out.append(
                    base64.b64decode(
                        item.split(",", 1)[1] if item.startswith("data:") else item, validate=True
                    )
                )
            except (binascii.Error, ValueError):
                raise DataError(f"inputs[{i}]: not base64 image bytes or an http(s) URL") from None
        return out

    auto_classes = ("AutoModelForImageClassification", "AutoImageProcessor")

    # ---- data -----------------------------------------------------------------------------------
    def load_processor(self, model_cfg: ModelConfig, model_path: str) -> ImageSpec:
        """The model's input size and normalisation, from its image processor or zoo entry."""
        if zoo.is_zoo(model_path):
            return zoo.get_entry(model_path).image
        from transformers import AutoImageProcessor

        try:
            with quiet_transformers():
                proc = AutoImageProcessor.from_pretrained(
                    model_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
                )
        except Exception as exc:
            raise ModelError(
                f"model.name_or_path: could not load an image processor from '{model_path}' "
                f"(is it a vision model?): {str(exc).splitlines()[0][:200]}"
            ) from None
        return ImageSpec.from_processor(proc)

    def columns(self, data_cfg: ImageClassificationData) -> list[str]:
        return [data_cfg.image_column, data_cfg.label_column]

    def _as_references(self, ds: Dataset, column: str) -> Dataset:
        """Hub / datasets Image features: keep the encoded bytes or path, never decoded arrays."""
        from datasets import Image

        if isinstance(ds.features.get(column), Image) and ds.features[column].decode:
            ds = ds.cast_column(column, Image(decode=False))
        return ds

    def prepare(self, cfg: RunConfig, processor: ImageSpec) -> PreparedData:
        d = cfg.data
        space_box: dict[str, LabelSpace] = {}
        notes: list[str] = []
        locations = {"data.train": d.train, "data.validation": d.validation, "data.test": d.test}

        def encode(ds: Dataset, key: str) -> Dataset:
            ds = self._as_references(ds, d.image_column)
            ds = check_images(
                ds,
                d.image_column,
                base_dir=_source_dir(locations.get(key)),
                max_bad=d.max_bad_images,
                key=key,
                notes=notes,
            )
            if "space" not in space_box:  # the first source read is train: it defines the label space
                space_box["space"] = LabelSpace.infer(
                    column_values(ds, d.label_column), d.label_names, key=key, notes=notes
                )
            return self.encode_labels(ds, d, space_box["space"], key=key)

        raw = build_splits(d, columns=self.columns(d), encode=encode, stratify="labels")
        space = space_box["space"]
        splits = {
            name: self.preprocess(ds, processor, d, space, key=f"data.{name}") for name, ds in raw.items()
        }
        stats: dict[str, Any] = {
            "sizes": {k: len(v) for k, v in raw.items()},
            "columns": raw["train"].column_names,
        }
        stats["label_counts"] = self.label_counts(raw, space)
        stats["warnings"] = notes
        stats["image"] = processor.to_dict() | {"input_size": d.image_size or processor.size}
        return PreparedData(DatasetDict(splits), processor, space, stats)

    def preprocess(
        self, ds: Dataset, processor: Any, data_cfg: ImageClassificationData, label_space: Any, *, key: str
    ) -> Dataset:
        ds = self._as_references(ds, data_cfg.image_column)
        if data_cfg.image_column != "image":
            if "image" in ds.column_names:
                ds = ds.remove_columns("image")
            ds = ds.rename_column(data_cfg.image_column, "image")
        return ds.remove_columns([c for c in ds.column_names if c not in {"image", "labels"}])

    def collate(self, processor: ImageSpec, data_cfg: ImageClassificationData, *, train: bool = False) -> Any:
        transforms = ImageTransforms(processor, data_cfg.augment, data_cfg.image_size, data_cfg.crop_pct)

        def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            # One augmentation seed per image from torch's generator: reproducible, and resumable
            # because the generator state is part of every checkpoint.
            seeds = (
                torch.randint(0, 2**31 - 1, (len(examples),)).tolist() if train else [None] * len(examples)
            )
            pixels, labels = [], []
            for ex, seed in zip(examples, seeds, strict=True):
                try:
                    img = load_image(ex["image"])
                except BadImage as exc:
                    if not train:
                        raise
                    log.warning("skipped an image that became unreadable during training: %s", exc)
                    continue
                pixels.append(transforms(img, train=train, seed=seed))
                if "labels" in ex:
                    labels.append(ex["labels"])
            if not pixels:
                raise DataError(
                    "no image of a training batch could be read; check that the image files "
                    "are still in place"
                )
            batch = {
                "pixel_values": torch.from_numpy(np.stack(pixels)).contiguous(
                    memory_format=torch.channels_last
                )
            }
            if labels:
                batch["labels"] = torch.tensor(labels, dtype=torch.long)
            return batch

        return collate_fn

    def plan_lines(self, cfg: RunConfig, stats: dict[str, Any]) -> list[str]:
        img, aug = stats.get("image"), cfg.data.augment
        if not img:
            return []
        crop = (
            f"random resized crop {list(aug.crop_scale)}" + (" + flip" if aug.hflip else "")
            if aug.enabled
            else "off"
        )
        return [
            f"  images    {img['input_size']}x{img['input_size']} input, mean {img['mean']}, "
            f"std {img['std']}; train augmentation: {crop}"
        ]

    # ---- model ----------------------------------------------------------------------------------
    def load_model(
        self,
        model_cfg: ModelConfig,
        model_path: str,
        label_space: LabelSpace,
        data_cfg: ImageClassificationData | None = None,
    ) -> tuple[torch.nn.Module, list[str]]:
        size = data_cfg.image_size if data_cfg else None
        labels = {
            "num_labels": label_space.num_labels,
            "id2label": label_space.id2label,
            "label2id": label_space.label2id,
        }
        if zoo.is_zoo(model_path):
            return zoo.build_classifier(model_path, image_size=size, dropout=model_cfg.dropout, **labels)
        from transformers import AutoModelForImageClassification

        config = load_base_config(model_cfg, model_path, **labels)
        try:
            with quiet_transformers():
                model, info = AutoModelForImageClassification.from_pretrained(
                    model_path,
                    config=config,
                    ignore_mismatched_sizes=True,
                    output_loading_info=True,
                    revision=model_cfg.revision,
                    trust_remote_code=model_cfg.trust_remote_code,
                )
        except ValueError as exc:
            if "Unrecognized configuration class" in str(exc) or "image classification" in str(exc).lower():
                raise ModelError(
                    f"model.name_or_path: '{model_path}' has no image-classification variant "
                    "(its architecture does not fit task image-classification); "
                    "pick a vision model such as ViT, ConvNeXt or ResNet"
                ) from None
            raise ModelError(
                f"model.name_or_path: could not load '{model_path}': {str(exc).splitlines()[0][:200]}"
            ) from None
        native = getattr(model.config, "image_size", None)
        if size and native and size != native:
            if "interpolate_pos_encoding" not in inspect.signature(model.forward).parameters:
                raise ModelError(
                    f"data.image_size: {size} differs from the {native} pixels this "
                    f"{model.config.model_type} model was built for; unset data.image_size"
                )
            # ViT-family models interpolate their position embeddings to another input size.
            model.register_forward_pre_hook(
                lambda _m, args, kwargs: (args, kwargs | {"interpolate_pos_encoding": True}), with_kwargs=True
            )
        return model, new_module_names(info.get("missing_keys", []), info.get("mismatched_keys", []))

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        # Channels-last convolutions run 1.5-2x faster on CPUs (measured on EfficientNet-Lite0 with
        # LoRA, fwd + bwd); converting after peft wraps the layers also covers the LoRA convolutions.
        return model.to(memory_format=torch.channels_last)

    # ---- export ---------------------------------------------------------------------------------
    onnx_axes: ClassVar[dict[int, str] | None] = {0: "batch"}

    def export_batches(
        self, processor: ImageSpec, data_cfg: ImageClassificationData
    ) -> list[dict[str, torch.Tensor]]:
        # Random pixels in the normalised range the model sees; the check is about the arithmetic.
        side = data_cfg.image_size or processor.size
        g = torch.Generator().manual_seed(0)
        return [{"pixel_values": torch.randn(n, 3, side, side, generator=g)} for n in (3, 1, 2)]

    def save_merged(self, model: torch.nn.Module, folder: Path, loaded: Any) -> None:
        if isinstance(model, zoo.ZooImageClassifier):
            zoo.save_merged(model, folder, loaded.meta["base_model"]["name_or_path"])
            return
        from transformers import AutoImageProcessor

        model.save_pretrained(str(folder), safe_serialization=True)
        with quiet_transformers():
            AutoImageProcessor.from_pretrained(loaded.model_path).save_pretrained(str(folder))

    def load_merged(self, folder: Path, loaded: Any) -> torch.nn.Module:
        if zoo.is_merged(folder):
            return zoo.load_merged(folder).eval()
        from transformers import AutoModelForImageClassification

        with quiet_transformers():
            model = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
        size = loaded.data_cfg.image_size if loaded.data_cfg else None
        if size and size != getattr(model.config, "image_size", size):
            # Trained at another input size: callers pass interpolate_pos_encoding=True, as here.
            model.register_forward_pre_hook(
                lambda _m, args, kwargs: (args, kwargs | {"interpolate_pos_encoding": True}), with_kwargs=True
            )
        return model

    example_input = "photo.jpg https://example.com/image.png"

    def usage(self, meta: dict[str, Any]) -> list[str]:
        base = meta["base_model"]
        where = base.get("resolved") or base["name_or_path"]
        id2label = (meta.get("label_space") or {}).get("id2label", {})
        labels = (
            f"num_labels={len(id2label)}, id2label={ {int(k): v for k, v in id2label.items()}!r}, "
            f"label2id={ {v: int(k) for k, v in id2label.items()}!r}"
        )
        size = meta.get("config", {}).get("data", {}).get("image_size")
        if zoo.is_zoo(base["name_or_path"]):
            return [
                "from peft import PeftModel",
                "from lorakit import zoo  # the backbone is not in Hugging Face format",
                "",
                f"base, _ = zoo.build_classifier({base['name_or_path']!r}, {labels}, image_size={size})",
                'model = PeftModel.from_pretrained(base, "ADAPTER_DIR").eval()',
                "# inputs: pixel_values normalised as in lorakit.json data.stats.image",
            ]
        return [
            "from peft import PeftModel",
            "from transformers import AutoImageProcessor, AutoModelForImageClassification",
            "",
            f"base = AutoModelForImageClassification.from_pretrained({where!r}, {labels})",
            'model = PeftModel.from_pretrained(base, "ADAPTER_DIR").eval()',
            f"processor = AutoImageProcessor.from_pretrained({where!r})",
        ]

    def describe(self, row: dict[str, Any], processor: Any) -> dict[str, str]:
        ref = row["image"]
        if isinstance(ref, dict):  # a Hub / datasets image: its path when it has one
            ref = ref.get("path") or ""
        return {"input": str(ref) or "<image bytes>", "image": str(ref)}

    # ---- prediction -----------------------------------------------------------------------------
    def serving_rows(
        self, processor: ImageSpec, data_cfg: ImageClassificationData, inputs: list[Any]
    ) -> list[dict[str, torch.Tensor]]:
        """Rows for encoded image bytes or http(s) URLs (the server never reads local paths)."""
        transforms = ImageTransforms(processor, data_cfg.augment, data_cfg.image_size, data_cfg.crop_pct)
        rows = []
        for i, item in enumerate(inputs):
            if isinstance(item, str) and not item.startswith(("http://", "https://")):
                raise DataError(f"inputs[{i}]: expected image bytes (base64 in JSON) or an http(s) URL")
            try:
                rows.append({"pixel_values": torch.from_numpy(transforms(load_image(item), train=False))})
            except BadImage as exc:
                raise DataError(f"inputs[{i}]: {exc}") from None
        return rows

    @torch.no_grad()
    def predict(
        self,
        model: torch.nn.Module,
        processor: ImageSpec,
        inputs: list[Any],
        label_space: LabelSpace,
        data_cfg: ImageClassificationData,
        *,
        top_k: int = 1,
        batch_size: int = 32,
    ) -> list[dict[str, Any]]:
        """Top-k labels for images given as paths, http(s) URLs, bytes or PIL images.

        Raises:
            DataError: An input is not a readable image (named in the message).
        """
        device = next(model.parameters()).device
        transforms = ImageTransforms(processor, data_cfg.augment, data_cfg.image_size, data_cfg.crop_pct)
        results: list[dict[str, Any]] = []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            pixels = []
            for item in chunk:
                try:
                    pixels.append(transforms(load_image(item), train=False))
                except BadImage as exc:
                    raise DataError(f"cannot predict: {exc}") from None
            x = torch.from_numpy(np.stack(pixels)).contiguous(memory_format=torch.channels_last)
            shown = [item if isinstance(item, str) else f"<{type(item).__name__}>" for item in chunk]
            results += self.top_k(model(pixel_values=x.to(device)).logits, shown, label_space, top_k)
        return results
