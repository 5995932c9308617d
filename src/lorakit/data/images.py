"""Images: reading image sources, decoding one image safely, and the train / eval transforms.

``datasets`` holds the rows (an ``image`` column of ``{"bytes", "path"}`` records, never decoded
tensors); albumentations does the augmentation; this module adds what they lack: an image-folder
and MNIST-style idx reader, decoding that turns any input (path, URL, bytes, PIL, array) into RGB and
reports bad images in one line, and the transform pair built from the model's own processor values.
"""

from __future__ import annotations

import gzip
import io
import logging
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from lorakit.config.schema import Section
from lorakit.errors import DataError

log = logging.getLogger("lorakit")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024


class AugmentConfig(Section):
    """Training-time image augmentation (evaluation never augments)."""

    enabled: bool = Field(
        True, description="Augment training images; off = training uses the evaluation transform."
    )
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="Random resized crop: the share of the image area a crop covers, (min, max)."
    )
    crop_ratio: tuple[float, float] = Field(
        (0.75, 4 / 3), description="Random resized crop: aspect-ratio range of the crop."
    )
    hflip: bool = Field(True, description="Flip training images horizontally with probability 0.5.")

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(
                f"data.augment.crop_scale: {list(self.crop_scale)} "
                "must satisfy 0 < min <= max <= 1, e.g. [0.5, 1.0]"
            )
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(
                f"data.augment.crop_ratio: {list(self.crop_ratio)} "
                "must satisfy 0 < min <= max, e.g. [0.75, 1.333]"
            )
        return self


class BadImage(DataError):
    """One image could not be read or decoded."""


# ---- sources ------------------------------------------------------------------------------------


def is_idx_file(path: str) -> bool:
    name = Path(path).name
    return "-images-idx3-ubyte" in name or name.endswith(
        ("-images.idx3-ubyte", ".idx3-ubyte", ".idx3-ubyte.gz")
    )


def read_image_folder(folder: str | Path, *, key: str) -> Any:
    """An image folder with one sub-folder per class -> rows ``{image: path, label: folder name}``."""
    from datasets import Dataset

    root = Path(folder)
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"{key}: folder '{folder}' has no sub-folders; put each class's images in a "
            "sub-folder named after the class"
        )
    paths, labels = [], []
    for d in classes:
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(f.resolve()))
                labels.append(d.name)
    if not paths:
        raise DataError(
            f"{key}: the class folders of '{folder}' hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return Dataset.from_dict({"image": paths, "label": labels})


def _open_maybe_gz(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


#: ``Dataset.info.description`` of rows made by :func:`read_idx`: PNGs lorakit wrote from valid pixels,
#: which need no decoding check.
IDX_ROWS = "lorakit: images decoded from an idx file"


def read_idx(images_file: str | Path, *, key: str) -> Any:
    """MNIST-style idx files (MNIST, Fashion-MNIST, KMNIST ...): ``*-images-idx3-ubyte[.gz]`` plus the
    ``*-labels-idx1-ubyte[.gz]`` beside it -> rows ``{image: PNG bytes, label: int}``."""
    from datasets import Dataset, DatasetInfo, Features, Image, Value
    from PIL import Image as PILImage

    images_file = Path(images_file)
    labels_file = images_file.with_name(
        images_file.name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
    )
    if not labels_file.is_file():
        raise DataError(
            f"{key}: no labels file '{labels_file.name}' beside '{images_file}'; idx data needs both files"
        )
    try:
        raw = _open_maybe_gz(images_file)
        magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
        lab = _open_maybe_gz(labels_file)
        lmagic, ln = struct.unpack(">II", lab[:8])
    except (OSError, struct.error, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{key}: '{images_file}' is not a readable idx file: {exc}") from None
    if magic != 2051 or lmagic != 2049 or n != ln or len(raw) != 16 + n * rows * cols or len(lab) != 8 + n:
        raise DataError(
            f"{key}: '{images_file}' / '{labels_file.name}' are not a matching idx3 images / idx1 labels pair"
        )
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)
    labels = np.frombuffer(lab, dtype=np.uint8, offset=8).astype(np.int64)

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        PILImage.fromarray(a, mode="L").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    records = [{"bytes": png(a), "path": None} for a in pixels]
    features = Features({"image": Image(decode=False), "label": Value("int64")})
    return Dataset.from_dict(
        {"image": records, "label": labels.tolist()},
        features=features,
        info=DatasetInfo(description=IDX_ROWS, features=features),
    )


# ---- decoding -----------------------------------------------------------------------------------


def fetch_url(url: str, *, timeout: float = 10.0) -> bytes:
    """Download an image over http(s), at most ``MAX_DOWNLOAD_BYTES``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = resp.read(MAX_DOWNLOAD_BYTES + 1)
    except Exception as exc:
        raise BadImage(
            f"could not download '{url}': "
            f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
        ) from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise BadImage(
            f"'{url}' is larger than {MAX_DOWNLOAD_BYTES // 2**20} MiB; download and shrink it first"
        )
    return data


def load_image(value: Any, *, base_dir: str | Path | None = None, allow_urls: bool = True) -> Any:
    """Decode one image (path, http(s) URL, bytes, ``{"bytes", "path"}`` record, PIL image or array)
    into an RGB PIL image; greyscale, palette and RGBA inputs are converted.

    Raises:
        BadImage: Missing, unreadable or corrupt, with the reason in one line.
    """
    from PIL import Image, UnidentifiedImageError

    src = str(value) if isinstance(value, Path) else value
    try:
        if isinstance(value, dict):
            src = value.get("bytes") or value.get("path")
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, np.ndarray):
            img = Image.fromarray(src)
        elif isinstance(src, (bytes, bytearray)):
            img = Image.open(io.BytesIO(src))
        elif isinstance(src, str) and src.startswith(("http://", "https://")):
            if not allow_urls:
                raise BadImage(f"'{src}': URLs are not allowed here")
            img = Image.open(io.BytesIO(fetch_url(src)))
        elif isinstance(src, str) and src:
            p = Path(src).expanduser()
            if not p.is_absolute() and base_dir is not None:
                p = Path(base_dir) / p
            img = Image.open(p)
        else:
            raise BadImage(
                f"{type(value).__name__} value {str(value)[:60]!r} is not an image, a path or a URL"
            )
        img.load()
        if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
            # Transparent areas become white, not black (what a viewer shows).
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        return img.convert("RGB")
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage(f"image file '{src}' does not exist") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        name = (
            src
            if isinstance(src, str)
            else f"<{len(src)} bytes>"
            if isinstance(src, (bytes, bytearray))
            else type(src).__name__
        )
        raise BadImage(
            f"image {name} cannot be decoded "
            f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
        ) from None


# ---- transforms ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects: input side, normalisation and the eval crop share (from its processor)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0

    @classmethod
    def from_processor(cls, proc: Any) -> ImageSpec:
        """Read size / mean / std / crop_pct from a transformers image processor."""

        def side_of(v: Any) -> int | None:
            # ints, dicts or transformers' SizeDict: {height, width} or {shortest_edge}
            if isinstance(v, (int, float)):
                return int(v)
            for key in ("height", "shortest_edge", "width"):
                got = v.get(key) if isinstance(v, dict) else getattr(v, key, None)
                if got:
                    return int(got)
            return None

        side = side_of(getattr(proc, "crop_size", None)) if getattr(proc, "do_center_crop", False) else None
        side = side or side_of(getattr(proc, "size", None))
        mean = tuple(getattr(proc, "image_mean", None) or (0.5, 0.5, 0.5))
        std = tuple(getattr(proc, "image_std", None) or (0.5, 0.5, 0.5))
        crop_pct = getattr(proc, "crop_pct", None) or 1.0
        return cls(int(side or 224), mean, std, float(crop_pct))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "crop_pct": self.crop_pct}


class ImageTransforms:
    """The train (random resized crop + flip) and eval (resize + center crop) pipelines of a run.

    Both end in normalisation with the model's mean / std and return float32 CHW arrays. Training
    draws one seed per image from torch's global generator, so augmentation is reproducible and
    resumes exactly (the generator is part of every checkpoint).
    """

    def __init__(
        self, spec: ImageSpec, augment: AugmentConfig, size: int | None = None, crop_pct: float | None = None
    ) -> None:
        import albumentations as A
        import cv2

        cv2.setNumThreads(1)  # the training loop owns the cores
        self.size = s = size or spec.size
        norm = A.Normalize(mean=spec.mean, std=spec.std, max_pixel_value=255.0)
        resize_to = max(s, round(s / (crop_pct or spec.crop_pct)))
        self.eval = A.Compose(
            [
                A.SmallestMaxSize(max_size=resize_to, interpolation=cv2.INTER_LINEAR),
                A.CenterCrop(height=s, width=s),
                norm,
            ]
        )
        if augment.enabled:
            steps = [
                A.RandomResizedCrop(
                    size=(s, s),
                    scale=augment.crop_scale,
                    ratio=augment.crop_ratio,
                    interpolation=cv2.INTER_LINEAR,
                )
            ]
            if augment.hflip:
                steps.append(A.HorizontalFlip(p=0.5))
            self.train: Any = A.Compose([*steps, norm])
        else:
            self.train = self.eval

    def __call__(self, img: Any, *, train: bool, seed: int | None = None) -> np.ndarray:
        pipe = self.train if train else self.eval
        if train and seed is not None and pipe is not self.eval:
            pipe.set_random_seed(seed)
        out = pipe(image=np.asarray(img))["image"]
        return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)
