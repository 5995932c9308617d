"""Base model + LoRA: resolve the model location, choose and check target modules, wrap with peft.

peft does LoRA. This module decides *where*: a default set of target modules per architecture,
a check that every requested target exists (with the model's real module names in the error), and
the task head plus any newly initialised module kept fully trainable via ``modules_to_save``.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.config.schema import LoraSettings, ModelConfig
from lorakit.errors import LorakitError, ModelError
from lorakit.files.hashing import update_with_file
from lorakit.files.paths import resolve_location

# Default LoRA targets per `config.model_type`: every linear layer inside the transformer blocks
# (attention projections and the MLP). Measured on IMDB with the packaged MiniLM, adapting the MLP
# as well as q/v closes most of the gap to full fine-tuning (README: "Defaults").
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "electra": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "deberta-v2": [
        "query_proj",
        "key_proj",
        "value_proj",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # Vision: attention query / value for ViT-family encoders (the LoRA paper's choice and the
    # original brief's), the pointwise MLP of ConvNeXt, every convolution of a ResNet.
    # (transformers 5 renamed several of them to q_proj / v_proj: both spellings are listed, and a
    # default keeps only the names the loaded model has).
    "vit": ["query", "value", "q_proj", "v_proj"],
    "deit": ["query", "value", "q_proj", "v_proj"],
    "beit": ["query", "value", "q_proj", "v_proj"],
    "dinov2": ["query", "value", "q_proj", "v_proj"],
    "swin": ["query", "value", "q_proj", "v_proj"],
    "convnext": ["pwconv1", "pwconv2"],
    "resnet": ["convolution"],
}


def default_targets(model_type: str | None) -> list[str] | str:
    """The default LoRA targets of an architecture (zoo entries included); ``all-linear`` if unknown."""
    from lorakit.models import zoo

    if model_type in zoo.ENTRIES:
        return list(zoo.ENTRIES[model_type].default_targets)
    return DEFAULT_TARGETS.get(model_type or "", "all-linear")


# AdamW peak learning rate when the config sets none. 1e-3 was measured best for LoRA on the
# transformer encoders (IMDB, MiniLM); a zoo CNN names its own (BENCHMARKS.md, quality).
DEFAULT_LEARNING_RATE = 1e-3


def default_learning_rate(name_or_path: str) -> float:
    """The default learning rate of a base model, known before it loads (zoo entries name their own)."""
    from lorakit.models import zoo

    if zoo.is_zoo(name_or_path):
        return zoo.get_entry(name_or_path).default_learning_rate
    return DEFAULT_LEARNING_RATE


_ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def resolve_model_path(model_cfg: ModelConfig) -> str:
    """The location transformers should load: a folder for local / pkg:// models, else the Hub id."""
    from lorakit.models import zoo

    if zoo.is_zoo(model_cfg.name_or_path):
        zoo.get_entry(model_cfg.name_or_path)  # checks the name
        return model_cfg.name_or_path
    try:
        path = resolve_location(model_cfg.name_or_path, what="model.name_or_path")
    except LorakitError as exc:
        raise ModelError(str(exc)) from None
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.resolve())
    if p.exists():
        if not (p / "config.json").is_file() and not any(p.glob("*.gguf")):
            raise ModelError(
                f"model.name_or_path: folder '{path}' has no config.json; point to a Hugging Face "
                "model folder"
            )
        check_weight_files(p)
        return str(p.resolve())
    if path.startswith((".", "/", "~")):
        raise ModelError(
            f"model.name_or_path: folder '{path}' does not exist; check the path or give a Hub id"
        )
    return path


def check_weight_files(folder: Path) -> None:
    """Refuse a model folder whose safetensors files are cut short or are not safetensors at all.

    Raises:
        ModelError: A weights file is damaged; the message names it and what was found.
    """
    from lorakit.files.integrity import safetensors_problem

    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        problem = safetensors_problem(f)
        if problem:
            raise ModelError(
                f"model.name_or_path: '{f}' is damaged ({problem}): an interrupted download or "
                "copy? fetch the model again"
            )


def reject_zoo(model_path: str) -> None:
    """For tasks that need a Hugging Face model: a zoo name is a one-line error naming its task."""
    from lorakit.models import zoo

    if zoo.is_zoo(model_path):
        entry = zoo.get_entry(model_path)
        raise ModelError(
            f"model.name_or_path: {model_path} is an {entry.task} model from lorakit's zoo; "
            "it does not fit this task"
        )


def load_base_config(model_cfg: ModelConfig, model_path: str, **kwargs: Any) -> Any:
    """The base model's transformers config with ``kwargs`` and the ``model.dropout`` override applied.

    Raises:
        ModelError: The location holds no model config (or the Hub cannot be reached).
    """
    from transformers import AutoConfig

    reject_zoo(model_path)
    try:
        config = AutoConfig.from_pretrained(
            model_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as exc:
        hub = (
            ""
            if Path(model_path).exists()
            else " (not a local folder, and the Hugging Face Hub could not serve it: offline or a wrong id?)"
        )
        raise ModelError(
            f"model.name_or_path: cannot load a model config from '{model_path}'{hub}: "
            f"{str(exc).splitlines()[0][:200]}"
        ) from None
    if model_cfg.dropout is not None:
        # Names differ per architecture (hidden_dropout_prob, attention_dropout, classifier_dropout, ...).
        for key, value in config.to_dict().items():
            if "dropout" in key and (
                isinstance(value, float) or (key == "classifier_dropout" and value is None)
            ):
                setattr(config, key, model_cfg.dropout)
    return config


def model_fingerprint(model_path: str, model: nn.Module | None = None) -> str:
    """A content hash of the base model: sha256 over its weight files, or the Hub commit hash.

    Stored with every adapter so that later stages can tell when a different base is used.
    """
    from lorakit.models import zoo

    if zoo.is_zoo(model_path):
        return zoo.fingerprint(model_path)
    p = Path(model_path)
    if p.is_dir() or p.is_file():
        files = (
            [p]
            if p.is_file()
            else sorted(
                f for f in p.iterdir() if f.suffix in {".safetensors", ".bin", ".gguf", ".pt"} and f.is_file()
            )
        )
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            update_with_file(h, f)
        return "sha256:" + h.hexdigest()
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return f"hub-commit:{commit}" if commit else "unknown"


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Distinct last-name components of the layers LoRA can wrap (linear, conv, embedding)."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, _ADAPTABLE)}
    )


def _matches(module_name: str, target: str) -> bool:
    # peft's rule: a target matches a module whose full name equals it or ends with "." + target.
    return module_name == target or module_name.endswith("." + target)


def resolve_targets(model: nn.Module, settings: LoraSettings, exclude: list[str]) -> list[str] | str:
    """The target modules to use: the configured ones (checked) or the architecture default.

    Args:
        model: The base model.
        settings: The lora section.
        exclude: Module paths that must not be targets (the head in modules_to_save).

    Returns:
        A list of name suffixes, or a regex / ``all-linear`` string as given.

    Raises:
        ModelError: A requested target matches no module; the message lists the real names.
    """
    targets = settings.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if targets is None:
        targets = default_targets(model_type)
        if isinstance(targets, list):
            present = [
                t
                for t in targets
                if any(_matches(n, t) for n, m in model.named_modules() if isinstance(m, _ADAPTABLE))
            ]
            targets = present or "all-linear"
    if isinstance(targets, str):
        if targets != "all-linear":
            names = [n for n, _ in model.named_modules()]
            if not any(re.fullmatch(targets, n) for n in names):
                raise ModelError(
                    f"lora.target_modules: regex '{targets}' matches no module of this {model_type} model; "
                    f"its adaptable layers are named: {', '.join(adaptable_module_names(model))}"
                )
            _refuse_self_padded(model, targets)
        return targets
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, _ADAPTABLE) and not any(n == e or n.startswith(e + ".") for e in exclude)
    ]
    real = adaptable_module_names(model)
    bad = [t for t in targets if not any(_matches(n, t) for n in names)]
    if bad:
        hints = []
        for t in bad:
            close = difflib.get_close_matches(t.rsplit(".", 1)[-1], real, n=1)
            hints.append(f"'{t}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ModelError(
            f"lora.target_modules: {', '.join(hints)} match{'es' if len(bad) == 1 else ''} no layer of this "
            f"{model_type} model; its adaptable layers are named: {', '.join(real)}"
        )
    _refuse_self_padded(model, targets)
    return list(targets)


def _refuse_self_padded(model: nn.Module, targets: list[str] | str) -> None:
    """A convolution that pads its own input before convolving (TF-'same' padding of a strided
    convolution, e.g. EfficientNet's) cannot be adapted: peft computes the adapter's convolution on the
    unpadded input, so its output has another shape. The error names them and gives the regex that
    adapts the rest."""

    def chosen(name: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(_matches(name, t) for t in targets)

    from lorakit.models.zoo import same_padding

    bad = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and same_padding(m) != () and chosen(n)
    ]
    if not bad:
        return
    wanted = (
        targets if isinstance(targets, str) else "(?:.*\\.)?(?:" + "|".join(map(re.escape, targets)) + ")"
    )
    rest = "(?!(?:" + "|".join(map(re.escape, bad)) + ")$)" + wanted
    raise ModelError(
        f"lora.target_modules: {', '.join(bad)} pad their input themselves ('same' padding of a strided "
        "convolution), which an adapted convolution does not do; leave them out with the regex "
        f"lora.target_modules: '{rest}', or train them in full with lora.modules_to_save"
    )


BLOCK_LISTS = ("layer", "layers", "h", "block", "blocks")  # the names peft knows for a model's list of blocks


def model_blocks(model: nn.Module) -> tuple[str, int] | None:
    """(path, count) of the model's longest list of blocks
    (``encoder.layer``, ``model.layers``, ...), or None."""
    lists = [
        (n, len(m))
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and n.rsplit(".", 1)[-1] in BLOCK_LISTS and len(m)
    ]
    return max(lists, key=lambda x: x[1]) if lists else None


def resolve_layers(model: nn.Module, layers: list[int]) -> tuple[list[int], str]:
    """``lora.layers`` as sorted non-negative block indices, and the path of the block list they index.

    Raises:
        ModelError: The model has no list of blocks, or an index is out of range.
    """
    blocks = model_blocks(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if blocks is None:
        raise ModelError(
            f"lora.layers: this {model_type or type(model).__name__} model has no list of blocks named "
            f"{', '.join(BLOCK_LISTS)}; remove lora.layers to adapt the whole model"
        )
    path, n = blocks
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ModelError(
            f"lora.layers: {', '.join(map(str, bad))} out of range: this model has {n} blocks "
            f"({path}.0 to {path}.{n - 1}); use 0 to {n - 1}, or -{n} to -1 from the top"
        )
    return sorted({i % n for i in layers}), path


def batch_norm_modules(model: nn.Module) -> list[str]:
    """Paths of the BatchNorm layers that keep running statistics."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def _freeze_in_eval_mode(module: nn.Module, _args: Any) -> None:
    module.training = False  # normalise with the pretrained statistics and never update them


@contextlib.contextmanager
def peft_wrap_warnings_off() -> Iterator[None]:
    """Silence transformers' FutureWarning that ``is_gradient_checkpointing`` is deprecated: peft reads
    that attribute whenever it wraps a model (peft 0.21 with transformers 5.24); no user can act on it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextlib.contextmanager
def mutated_base_warnings_off() -> Iterator[None]:
    """Silence peft's warning that PiSSA / OLoRA change the base weights (when it wraps the model and when
    the saved adapter's conversion loads the initial one): lorakit saves such adapters converted to plain
    LoRA."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*changes the base weights of the model")
        yield


def apply_lora(
    model: nn.Module, settings: LoraSettings, *, task_type: str | None, new_modules: list[str]
) -> Any:
    """Wrap ``model`` with peft LoRA; new (randomly initialised) modules are trained fully and saved.

    BatchNorm layers update running statistics in training mode even when frozen, which would make
    the trained model differ from base + adapter. They are either trained and saved with the adapter
    (``lora.batch_norm: train``) or pinned to evaluation mode (``freeze``).

    Returns:
        The ``peft.PeftModel``.

    Raises:
        ModelError: Bad targets or a combination peft rejects.
    """
    from peft import get_peft_model

    norms = batch_norm_modules(model)
    if settings.batch_norm == "freeze":
        for name in norms:
            model.get_submodule(name).register_forward_pre_hook(_freeze_in_eval_mode)
        norms = []
    modules_to_save = sorted(set(new_modules) | set(settings.modules_to_save) | set(norms))
    targets = resolve_targets(model, settings, exclude=modules_to_save)
    layers, pattern = None, None
    if settings.layers:
        layers, path = resolve_layers(model, settings.layers)
        pattern = path.rsplit(".", 1)[-1]  # peft's layers_pattern: the block list's own name
        if (
            targets == "all-linear"
        ):  # peft takes block indices with a list of names only: its all-linear rule, inside the blocks
            from transformers.pytorch_utils import Conv1D

            targets = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in model.named_modules()
                    if n.startswith(path + ".") and isinstance(m, (nn.Linear, Conv1D))
                }
            )
        elif isinstance(targets, str):
            raise ModelError(
                "lora.layers cannot be combined with a regex lora.target_modules; give the targets as a "
                "list of names, or put the block indices in the regex and remove lora.layers"
            )
    config = peft_config(
        settings, task_type=task_type, targets=targets, modules_to_save=modules_to_save, layers=layers
    )
    if layers:
        config.layers_pattern = pattern
    try:
        with mutated_base_warnings_off(), peft_wrap_warnings_off():
            wrapped = get_peft_model(model, config)
    except (ValueError, TypeError) as exc:
        raise ModelError(
            f"lora: peft could not apply this configuration: {str(exc).splitlines()[0][:300]}"
        ) from None
    check_patterns(wrapped, settings)
    check_rank(wrapped, settings.r)
    return wrapped


def peft_config(
    settings: LoraSettings,
    *,
    task_type: str | None,
    targets: list[str] | str,
    modules_to_save: list[str],
    layers: list[int] | None,
) -> Any:
    """The peft config of ``lora.method``: ``LoraConfig``, ``LoHaConfig`` or ``LoKrConfig``.

    The settings peft's three methods share (rank, alpha, targets, per-layer patterns, blocks, heads)
    are passed alike; the LoRA-only ones (dropout, rsLoRA, DoRA, init, bias) were refused for LoHa /
    LoKr when the config was loaded, and ``effective_conv2d`` for LoRA.
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    common = {
        "task_type": task_type,
        "r": settings.r,
        "target_modules": targets,
        "rank_pattern": dict(settings.rank_pattern),
        "alpha_pattern": dict(settings.alpha_pattern),
        "modules_to_save": modules_to_save or None,
        "layers_to_transform": layers,
    }
    if settings.method == "lora":
        init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[settings.init]
        return LoraConfig(
            **common,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            bias=settings.bias,
            use_rslora=settings.use_rslora,
            use_dora=settings.use_dora,
            init_lora_weights=init,
        )
    # LoHa / LoKr: peft's defaults start the update at zero (one factor zero), as LoRA's B is.
    cls = LoHaConfig if settings.method == "loha" else LoKrConfig
    return cls(**common, alpha=settings.alpha, use_effective_conv2d=settings.effective_conv2d)


#: How peft names the tensors of each method's layers: LoRA's ``lora_A`` / ``lora_B`` (and DoRA's
#: ``lora_magnitude_vector``), LoHa's ``hada_w1_a`` ..., LoKr's ``lokr_w1`` ...
ADAPTER_TENSOR_PREFIXES = (".lora_", ".hada_", ".lokr_")


def is_adapter_weight(key: str) -> bool:
    """Whether a state-dict key of a peft model is adapter state: an adapter tensor of any method, or a
    copy of a module trained in full (``modules_to_save``). What checkpoints and the best weights hold."""
    return "modules_to_save" in key or any(p in key for p in ADAPTER_TENSOR_PREFIXES)


def adapted_layers(model: nn.Module) -> list[str]:
    """Paths (in the base model) of the layers a peft model adapts: LoRA, LoHa or LoKr layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if isinstance(m, BaseTunerLayer) and hasattr(m, "r")
    ]


def check_patterns(model: nn.Module, settings: LoraSettings) -> None:
    """Refuse a ``lora.rank_pattern`` / ``alpha_pattern`` key that matches no adapted layer (peft would
    silently keep ``r`` / ``alpha`` there).

    Raises:
        ModelError: A key matches none of the adapted layers; the message lists them.
    """
    from peft.utils.other import get_pattern_key

    layers = adapted_layers(model)
    for field, pattern in (
        ("rank_pattern", settings.rank_pattern),
        ("alpha_pattern", settings.alpha_pattern),
    ):
        # peft's own rule: a key matches a layer whose path ends with it (as a regex) after a dot
        used = {get_pattern_key(list(pattern), name) for name in layers}
        bad = [k for k in pattern if k not in used]
        if bad:
            shown = ", ".join(layers[:40]) + (f", ... ({len(layers)} in all)" if len(layers) > 40 else "")
            raise ModelError(
                f"lora.{field}: {', '.join(repr(k) for k in bad)} match{'es' if len(bad) == 1 else ''} no "
                f"adapted layer; the adapted layers are: {shown}"
            )


def enable_gradient_checkpointing(
    model: nn.Module, name: str, share: bool | float = True, *, required: bool = True
) -> int:
    """``train.gradient_checkpointing``: transformers' own, non-reentrant (it needs no input that
    requires grad, which a frozen embedding under LoRA would not give), on every block (``share`` True)
    or on that share of the blocks, spread evenly. The number of blocks that recompute; 0 when the model
    cannot and checkpointing was not ``required`` (a task's default rather than the user's setting).

    Raises:
        ModelError: The model has no gradient checkpointing (zoo CNNs, some remote-code models).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        if not required:
            return 0
        raise ModelError(
            f"train.gradient_checkpointing: {name} does not support gradient checkpointing (transformers "
            "models that do: Llama, Qwen, Mistral, BERT, ViT, ...); set it to false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x: the new name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    n = len(blocks) if share is True else max(1, round(float(share) * len(blocks)))
    keep = {int(i * len(blocks) / n) for i in range(n)}  # evenly spread, the lowest block first
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i in keep
    return len(keep) if blocks else 0


TRAINING_ATTENTION = "lorakit_sdpa"  # transformers' SDPA, with the differentiated CPU bf16 passes in fp32


def _sdpa_with_fp32_training(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention, except that a bf16 pass on the CPU that will be differentiated runs
    in fp32: PyTorch's CPU flash-attention kernel takes 1.75-2.6x as long forward + backward in bf16 as in
    fp32, while forward alone it is 1.65-1.8x faster in bf16, so evaluation and generation stay in bf16
    (bench/chat_levers-2026-12-01.txt; BENCHMARKS.md, causal LM levers)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cpu_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if not (cpu_bf16 and query.requires_grad and query.device.type == "cpu"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back to bf16
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(torch.bfloat16), weights  # what SDPA returns under bf16 autocast


def use_fp32_training_attention(model: nn.Module, device: torch.device, amp: torch.dtype | None) -> bool:
    """Switch a transformers model that attends with SDPA to :func:`_sdpa_with_fp32_training` when it
    trains under bf16 autocast on the CPU; True if it was switched. The attention masks are built as for
    SDPA; nothing is saved with the model (an adapter never carries it, a merged export loads with
    transformers' default)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if device.type != "cpu" or amp is not torch.bfloat16:
        return False
    if getattr(getattr(base, "config", None), "_attn_implementation", None) != "sdpa":
        return False  # zoo CNNs, eager-only models, or one the user configured otherwise
    if not getattr(base, "is_backend_compatible", lambda: False)():
        return False  # SDPA written into the model's own code: no attention function to swap
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TRAINING_ATTENTION, _sdpa_with_fp32_training)
    AttentionMaskInterface.register(TRAINING_ATTENTION, sdpa_mask)
    base.set_attn_implementation(TRAINING_ATTENTION)
    return True


def store_frozen_linears_in(model: nn.Module, amp: torch.dtype | None) -> int:
    """Keep the frozen weights of the model's ``nn.Linear`` layers in bf16 when it trains under bf16
    autocast; the number of layers cast. Autocast would cast them to bf16 in every forward pass anyway,
    and keep the copies for the backward: stored in bf16 they take half the memory, are not copied, and
    every matmul sees the same numbers. Left in fp32: trainable layers (LoRA, heads), weights a
    non-Linear module shares (tied input embeddings), DoRA's base layers (their weight norm is taken
    outside a matmul) and anything not plain fp32 (quantized layers). Only for a model that runs under
    autocast wherever it runs in the training process: the recipe's training, evaluation and scoring."""
    if amp is not torch.bfloat16:
        return 0
    shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(False)}
    dora = {
        id(m.get_base_layer())
        for m in model.modules()
        if any(getattr(m, "use_dora", {}).values()) and hasattr(m, "get_base_layer")
    }
    cast = 0
    for m in model.modules():
        params = [p for p in (m.weight, m.bias) if p is not None] if type(m) is nn.Linear else []
        if not params or id(m) in dora or any(id(p) in shared for p in params):
            continue
        if all(not p.requires_grad and p.dtype == torch.float32 for p in params):
            m.to(torch.bfloat16)
            cast += 1
    return cast


def check_rank(model: nn.Module, r: int) -> None:
    """Refuse a LoRA rank that is not below the width of every layer it adapts.

    A rank-r update of a layer with ``n = min(in, out)`` is full rank once r >= n: the "adapter" is
    then a dense fine-tune with more parameters than the layer. The rank that still saves parameters
    is below ``in * out / (in + out)`` (n / 2 for a square layer); the message proposes that.

    Args:
        model: The peft-wrapped model (its LoRA layers know their ``in_features`` / ``out_features``).
        r: ``lora.r``.

    Raises:
        ModelError: A target layer is no wider than ``r``; the message names it and a rank that fits.
    """
    from peft.tuners.lora import LoraLayer

    widths = [
        (name, m.in_features, m.out_features, m.r.get("default", r))
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    ]
    too_wide = [w for w in widths if w[3] >= min(w[1], w[2])]  # each layer's own rank (lora.rank_pattern)
    if not too_wide:
        return
    name, n_in, n_out, rank = too_wide[0]
    smallest_saving = min((i * o - 1) // (i + o) for _, i, o, _ in widths)  # r * (in + out) < in * out
    key = "lora.r" if rank == r else "lora.rank_pattern: rank"
    raise ModelError(
        f"{key} = {rank} is not below the width of '{name.removeprefix('base_model.model.')}' "
        f"({n_in} in, {n_out} out): the update would be full rank with more parameters than the "
        f"layer; use lora.r <= {max(1, smallest_saving)}, the largest rank whose two LoRA matrices "
        "are smaller than every layer they adapt"
    )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def pick_device(requested: str) -> torch.device:
    """`auto` prefers CUDA, then Apple MPS, then CPU.

    Raises:
        LorakitError: The requested device is not available.
    """
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise LorakitError(
            "train.device: cuda was asked for but no CUDA GPU is visible; set train.device: auto or cpu"
        )
    if requested == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise LorakitError(
            "train.device: mps was asked for but Apple MPS is not available; set train.device: auto or cpu"
        )
    return torch.device(requested)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), not by emulation."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPUID probes
    return any(bool(getattr(cpu, probe, lambda: False)()) for probe in probes)


def pick_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.mixed_precision`, or None for fp32.

    `auto` uses bf16 on CUDA GPUs that support it, fp16 on older ones; bf16 on CPUs with native bf16
    (training steps 2.2-2.6x faster on MiniLM, 1.4-2.7x on EfficientNet-Lite0, 2x on SmolLM2; held-out
    accuracy within a point of fp32: BENCHMARKS.md, training speed); fp32 elsewhere: CPUs without it
    emulate bf16, which is slower than fp32.
    """
    if requested == "no":
        return None
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    if requested == "fp16" and device.type == "cpu":
        raise LorakitError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on a CPU")
    return torch.float16 if requested == "fp16" else torch.bfloat16


def precision_name(amp: torch.dtype | None) -> str:
    """How logs, plans and metrics.json name the precision :func:`pick_precision` chose."""
    return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(amp, "fp32")


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load-time chatter; lorakit reports new modules itself."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def new_module_names(missing_keys: list[str], mismatched_keys: list[Any]) -> list[str]:
    """Module paths (``classifier``, ``pooler.dense``) whose weights the checkpoint did not provide."""
    keys = list(missing_keys) + [k[0] if isinstance(k, (tuple, list)) else k for k in mismatched_keys]
    return sorted({k.rsplit(".", 1)[0] for k in keys if "." in k})


def load_tokenizer(model_cfg: ModelConfig, model_path: str) -> Any:
    """The base model's tokenizer, for the tasks that read text with an encoder (a zoo entry has none).

    Raises:
        ModelError: A zoo backbone, or no tokenizer can be loaded from ``model_path``.
    """
    from transformers import AutoTokenizer

    reject_zoo(model_path)
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(
                model_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
            )
    except Exception as exc:
        raise ModelError(
            f"model.name_or_path: could not load a tokenizer from '{model_path}': "
            f"{str(exc).splitlines()[0][:200]}"
        ) from None
