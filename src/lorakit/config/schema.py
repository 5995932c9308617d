"""The run configuration's sections: one YAML file with sections data / model / lora / train / output.

Each section is a typed pydantic model whose fields document themselves; a task subclasses ``DataConfig``
and ``TrainConfig`` for its own fields. Loading and validation live in :mod:`lorakit.config.loading`.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lorakit.files.paths import pkg_problem


class _Loader(yaml.SafeLoader):
    """YAML with the 1.2 booleans: only true / false, so `mixed_precision: no` stays the string "no"."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    """Parse YAML as lorakit's configs are read (YAML 1.2 booleans;
    `yes` / `no` / `on` / `off` are strings)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


DEFAULT_TASK = "text-classification"
TrackerName = Literal["tensorboard", "mlflow", "wandb"]


class Section(BaseModel):
    # Unknown keys are errors (typos must not be silently ignored); validate on assignment too. No
    # float is nan or inf: `nan < 1` is False, so a bound would call nan "not less than 1".
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _pkg_form(section: str) -> Any:
    """A validator refusing a ``pkg://`` location of the wrong form at load time, before anything is
    read (:func:`lorakit.files.paths.pkg_problem`)."""

    def check(value: Any, info: ValidationInfo) -> Any:
        problem = pkg_problem(value, what=f"{section}.{info.field_name}") if isinstance(value, str) else None
        if problem:
            raise ValueError(problem)
        return value

    return check


class DataConfig(Section):
    """Where the examples come from and how they are split: the fields every task has. Each task's own
    fields (columns, lengths, image sizes, prompt formats) are on its subclass in ``lorakit/tasks/``."""

    train: str = Field(
        description="Training data: a csv/tsv/json/jsonl/parquet file or glob, a pkg:// path inside an "
        "installed package, or a Hub dataset name. Always set.",
    )
    validation: str | None = Field(
        None,
        description="Validation data in the format of `train`, scored at each evaluation to pick the best "
        "adapter; unset = a seeded split of `train` (`validation_size`). Set it when you have a "
        "fixed validation set.",
    )
    test: str | None = Field(
        None,
        description="Held-out test data, scored once at the end; unset = a split of `train` when `test_size` "
        "> 0, else no test. Set it to report results on a fixed test set.",
    )
    format: Literal["auto", "csv", "json", "jsonl", "parquet", "imagefolder", "idx", "hub"] = Field(
        "auto",
        description="How to read the data files; `auto` decides by extension (a folder of class sub-folders "
        "is an image folder, `*-images-idx3-ubyte[.gz]` is MNIST-style idx, a name that is no "
        "file is a Hub dataset). Change it only for files whose extension does not say their "
        "format.",
    )
    hub_split: str = Field(
        "train",
        description="Which split of the Hub dataset named by `train` to read (e.g. train, validation). Change"
        " it for datasets whose training split has another name.",
    )
    label_names: list[str] | None = Field(
        None,
        description="Class names for integer labels 0..K-1, in id order (e.g. [negative, positive]); used in "
        "reports, predictions and the model card. Set it when the label column holds integers.",
    )
    where: dict[str, Any] = Field(
        default_factory=dict,
        description="Keep only the rows whose columns equal these values, e.g. {source: imdb}. Use it to "
        "train on part of a file without editing it.",
    )
    validation_size: float = Field(
        0.1,
        gt=0,
        description="Share (below 1) or number (1 or more) of `train` rows held out for validation when "
        "`validation` is unset, split per class. Lower it for small data sets, raise it for "
        "steadier best-adapter choice.",
    )
    test_size: float = Field(
        0,
        ge=0,
        description="Share (below 1) or number (1 or more) of `train` rows held out as the test split when "
        "`test` is unset; 0 = no test split. Set it to get a held-out score without a separate "
        "file.",
    )
    max_train_samples: int | None = Field(
        None,
        ge=1,
        description="Train on at most this many examples (a seeded sample); unset = all. Use it for quick "
        "trial runs before the full one.",
    )
    max_eval_samples: int | None = Field(
        None,
        ge=1,
        description="Score at most this many validation and test examples each (a seeded sample); unset = "
        "all. Lower it when evaluations take too long.",
    )
    seed: int = Field(
        42,
        description="Seed of the splits and samples: the same seed gives the same examples. Change it to see "
        "how much results depend on the split.",
    )

    _locations = field_validator("train", "validation", "test")(_pkg_form("data"))

    @model_validator(mode="after")
    def _sizes(self) -> DataConfig:
        for key in ("validation_size", "test_size"):
            v = getattr(self, key)
            if v >= 1 and v != int(v):
                raise ValueError(
                    f"data.{key}: {v} is neither a share below 1 nor a whole count; use e.g. 0.1 or 500"
                )
        return self


class TokenizedDataConfig(DataConfig):
    """Data of the tasks that read tokenized text."""

    max_length: int = Field(
        256,
        ge=8,
        le=32768,
        description="Tokens per example; longer inputs are truncated (see `truncation`), shorter ones padded "
        "per batch. Raise it for long texts (memory and time grow with it), lower it to train "
        "faster.",
    )
    pad_to_multiple_of: int | None = Field(
        32,
        ge=1,
        le=1024,
        description="Each batch is padded to its longest example rounded up to a multiple of this many "
        "tokens, so batches come in few shapes and memory stays flat over a run; null = exactly "
        "the longest example. Rarely worth changing.",
    )


class ModelConfig(Section):
    """The pretrained base model."""

    name_or_path: str = Field(
        description="The pretrained base model: a local folder, a pkg:// path, a Hugging Face Hub id, a .gguf"
        " file, or `zoo:<name>` for lorakit's model zoo. Always set.",
    )
    revision: str | None = Field(
        None,
        description="Hub revision of the model (branch, tag or commit id); unset = the default branch. Pin it"
        " to make runs reproducible.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow Python code shipped in the Hub repository to run when the model is loaded. Only "
        "for models you trust whose architecture transformers does not include.",
    )
    gguf_file: str | None = Field(
        None,
        description="The GGUF file inside the `name_or_path` folder (dequantised on load); found "
        "automatically when `name_or_path` is a .gguf file or a folder with exactly one. Set it "
        "when a folder holds several.",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="Load the frozen base in 4 or 8 bits (QLoRA) to fit larger models in GPU memory; needs a "
        "CUDA GPU and bitsandbytes. Leave `none` on CPUs.",
    )
    dropout: float | None = Field(
        0.0,
        ge=0,
        lt=1,
        description="Set every dropout probability of the base model (hidden, attention, classifier); null "
        "keeps the model's own. The default 0 makes CPU steps much faster and cost no accuracy in"
        " short LoRA runs; raise it for long runs on small data.",
    )

    _location = field_validator("name_or_path")(_pkg_form("model"))


AdapterMethod = Literal["lora", "loha", "lokr"]
#: What peft calls each method's adapter type (``adapter_config.json``'s ``peft_type``).
PEFT_TYPES: dict[str, str] = {"lora": "LORA", "loha": "LOHA", "lokr": "LOKR"}
#: The method's name for people (messages, logs, the model card).
METHOD_NAMES: dict[str, str] = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


def _lora_only(value: Any, info: ValidationInfo, default: Any, fix: str) -> Any:
    """A LoRA-only setting with ``lora.method`` loha / lokr: one problem naming the method and the fix."""
    method = info.data.get("method", "lora")
    if method != "lora" and value != default:
        raise ValueError(
            f"lora.{info.field_name}: {value!r} is a LoRA setting that {METHOD_NAMES[method]} does not have; "
            f"{fix}, or use lora.method: lora"
        )
    return value


def _pattern_keys(value: Any, info: ValidationInfo) -> Any:
    """Refuse a ``rank_pattern`` / ``alpha_pattern`` key that is not a regex (before its values are checked,
    so that both problems are reported at once)."""
    bad = []
    for key in value if isinstance(value, dict) else []:
        try:
            re.compile(key)
        except re.error as exc:
            bad.append(f"'{key}' ({exc})")
    if bad:
        raise ValueError(
            f"lora.{info.field_name}: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not a valid regex; "
            "write a layer name suffix such as 'blocks.0.conv' or a regex such as 'blocks\\.[0-3]\\..*'"
        )
    return value


class LoraSettings(Section):
    """Adapter hyperparameters (passed to peft's LoraConfig, LoHaConfig or LoKrConfig)."""

    method: AdapterMethod = Field(
        "lora",
        description="The kind of adapter: `lora` (a low-rank update B @ A per layer), `loha` (the Hadamard "
        "product of two low-rank updates: rank r^2 from the parameters of rank 2r) or `lokr` (a "
        "Kronecker product of a small and a low-rank matrix). LoHa and LoKr were made for "
        "convolutions: try them on CNNs when LoRA stays short of full fine-tuning. They merge and "
        "serve like LoRA, but without the gathered multi-adapter kernel and without GGUF / vLLM "
        "export.",
    )
    r: int = Field(
        8,
        ge=1,
        le=4096,
        description="Rank of the LoRA update matrices: more rank, more trainable parameters and capacity. "
        "Raise it (16, 32) when the adapter underfits a large data set.",
    )
    alpha: float = Field(
        16,
        gt=0,
        description="Scaling numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with "
        "`use_rslora`). Usually twice `r`; raise it to make the update stronger at the same rank.",
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout probability on the input of each LoRA update. Raise it (0.05-0.1) against "
        "overfitting on small data.",
    )
    target_modules: list[str] | str | None = Field(
        None,
        description="The layers that get LoRA: module name suffixes (e.g. [query, value]), a regex string, or"
        " `all-linear`; unset = the architecture's default (every linear layer of the blocks for "
        "known models). A wrong name is an error listing the model's layers.",
    )
    layers: list[int] | None = Field(
        None,
        min_length=1,
        description="Adapt only these blocks (0 = the lowest, -1 = the top one; e.g. [-3, -2, -1]); unset = "
        "every block. Fewer blocks make training faster (the backward pass stops at the lowest "
        "one) at some cost in accuracy.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none",
        description="Which biases are trained with the adapter: `none`, `all`, or `lora_only` (those of "
        "adapted layers). Leave `none` unless you have a reason.",
    )
    use_rslora: bool = Field(
        False,
        description="Rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead of alpha / r, which "
        "keeps large ranks from learning too slowly. Try it with ranks of 32 and more.",
    )
    use_dora: bool = Field(
        False,
        description="Weight-decomposed LoRA (DoRA): learns a magnitude per output as well as a direction; "
        "somewhat more memory and time per step. Try it when plain LoRA falls short of full fine-"
        "tuning.",
    )
    effective_conv2d: bool = Field(
        False,
        description="LoHa / LoKr only: decompose a k x k convolution's update over its kernel as well (the "
        "FedPara paper's Tucker form, peft's `use_effective_conv2d`) instead of as one flattened "
        "matrix: fewer parameters per rank on k x k kernels (1 x 1 ones are unchanged). Try it "
        "when the adapted convolutions have large kernels.",
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description="Per-layer ranks that differ from `r`: layer name suffix or regex -> rank (peft's "
        "rank_pattern), e.g. {'_conv_head': 32}. A key that matches no adapted layer is an error "
        "listing the adapted layers. Give more rank to the layers that carry most of the change "
        "(often the top ones).",
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict,
        description="Per-layer alphas that differ from `alpha`, keyed as `rank_pattern` (peft's "
        "alpha_pattern). Set it beside `rank_pattern` to keep alpha / r the same on the layers "
        "whose rank you changed.",
    )
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default",
        description="How the update matrices start: `default` (A random, B zero: the adapter starts as a no-"
        "op), `gaussian`, `pissa` (from the weight's top singular vectors; exact SVD, slow on "
        "large models) or `olora` (QR). PiSSA / OLoRA adapters are saved as plain LoRA of rank 2r"
        " for the original base.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Further modules trained in full and saved with the adapter (the task's new head always "
        "is). Add e.g. an embedding layer when new tokens must be learned.",
    )
    batch_norm: Literal["train", "freeze"] = Field(
        "train",
        description="BatchNorm layers of CNNs: `train` trains them and saves them with the adapter (their "
        "statistics follow your data); `freeze` keeps the pretrained ones (pure LoRA). Use "
        "`freeze` only when your images resemble the pretraining data.",
    )

    @field_validator("dropout")
    @classmethod
    def _dropout_is_lora(cls, v: float, info: ValidationInfo) -> float:
        return _lora_only(v, info, 0.0, "set it to 0")

    @field_validator("use_rslora", "use_dora")
    @classmethod
    def _variant_is_lora(cls, v: bool, info: ValidationInfo) -> bool:
        return _lora_only(v, info, False, "set it to false")

    @field_validator("init")
    @classmethod
    def _init_is_lora(cls, v: str, info: ValidationInfo) -> str:
        return _lora_only(v, info, "default", "remove it")

    @field_validator("bias")
    @classmethod
    def _bias_is_lora(cls, v: str, info: ValidationInfo) -> str:
        return _lora_only(v, info, "none", "remove it")

    @field_validator("effective_conv2d")
    @classmethod
    def _effective_conv2d_is_lycoris(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("method", "lora") == "lora":
            raise ValueError(
                "lora.effective_conv2d: true applies to LoHa and LoKr only; set lora.method: loha or lokr, "
                "or remove it"
            )
        return v

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _patterns_compile(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _pattern_keys(v, info)

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns_positive(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        bad = [
            f"'{k}': {n}" for k, n in v.items() if n <= 0 or (info.field_name == "rank_pattern" and n > 4096)
        ]
        if bad:
            what = "ranks from 1 to 4096" if info.field_name == "rank_pattern" else "alphas above 0"
            raise ValueError(f"lora.{info.field_name}: {', '.join(bad)}: give {what}")
        return v


class TrainConfig(Section):
    """Optimisation and evaluation schedule."""

    epochs: float = Field(
        3,
        gt=0,
        description="Passes over the training data; fractions allowed (1.5 = one and a half). Raise it when "
        "validation still improves at the end.",
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Stop after this many optimizer steps, whatever `epochs` says; unset = run the epochs. "
        "Use it to bound a run's time exactly.",
    )
    batch_size: int = Field(
        16,
        ge=1,
        description="Examples per forward pass, per process; lower it when memory runs out (and raise "
        "`gradient_accumulation_steps` to keep the effective batch).",
    )
    eval_batch_size: int | None = Field(
        None,
        ge=1,
        description="Examples per forward pass during evaluation; unset = `batch_size` on CPUs (bigger "
        "batches only raise the memory peak there), 4 x `batch_size` on GPUs. Raise it on GPUs "
        "with memory to spare.",
    )
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        description="Forward passes whose gradients are summed before each optimizer step: the effective "
        "batch is batch_size x this x processes. Raise it to train with a large batch in little "
        "memory.",
    )
    learning_rate: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Peak learning rate of AdamW (A, B and the head alike); unset = the architecture's "
        "default (1e-3 for transformers, 5e-3 for the zoo's EfficientNet-Lite0). Lower it when "
        "the loss jumps or diverges.",
    )
    head_learning_rate: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Learning rate of what is trained in full (the task head, BatchNorm layers, "
        "`lora.modules_to_save`); unset = `learning_rate`. Lower it when the new head overfits "
        "before the adapter has learned.",
    )
    lora_plus_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: the B matrices learn at learning_rate x this ratio (the paper suggests 16); unset"
        " = the same rate as A. Pair a high ratio with a lower `learning_rate`.",
    )
    weight_decay: float = Field(
        0.01,
        ge=0,
        description="AdamW weight decay, per step, on weights (never on biases and norms). Raise it against "
        "overfitting on small data.",
    )
    adam_betas: tuple[float, float] = Field(
        (0.9, 0.999),
        description="AdamW's (beta1, beta2): decay rates of the gradient's running mean and variance. Rarely "
        "changed.",
    )
    warmup_ratio: float = Field(
        0.06,
        ge=0,
        lt=1,
        description="Share of the optimizer steps (0-1) over which the learning rate rises linearly from 0 to"
        " its peak. Raise it when the first steps make the loss jump.",
    )
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear",
        description="How the learning rate moves after warm-up: `linear` to 0, `cosine` to 0, `constant`, or "
        "`constant_with_warmup`. Try `cosine` for long runs.",
    )
    max_grad_norm: float | None = Field(
        1.0,
        gt=0,
        description="Clip the gradient's global L2 norm to this value before each step; null = no clipping. "
        "Lower it when losses spike.",
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto",
        description="`auto` = bf16 (or fp16) autocast on a CUDA GPU, bf16 on a CPU with native bf16 "
        "(AVX512-BF16 / AMX), fp32 otherwise; `no` = fp32, `bf16` / `fp16` force autocast. Set "
        "`no` for the last fraction of a point of accuracy at up to twice the time; `lorakit env`"
        " shows what `auto` picks.",
    )
    group_by_length: bool = Field(
        True,
        description="Batch examples of similar length together (shuffled in groups), so less padding is "
        "computed. Turn it off only to compare with plain random batches.",
    )
    gradient_checkpointing: bool | float = Field(
        False,
        description="Recompute the activations of transformer blocks in the backward pass instead of keeping "
        "them: true = every block, a share between 0 and 1 = that share of the blocks, spread "
        "evenly. Turn it on when memory runs out; steps get slower.",
    )

    @field_validator("gradient_checkpointing")
    @classmethod
    def _checkpointing_share(cls, v: bool | float) -> bool | float:
        if not isinstance(v, bool) and not 0 < v <= 1:
            raise ValueError("a share of the blocks must be above 0 and at most 1 (or true / false)")
        return v

    eval_every_steps: int | None = Field(
        None,
        ge=1,
        description="Evaluate (and checkpoint) every N optimizer steps; unset = at the end of each epoch. Set"
        " it for long epochs, for early stopping within an epoch, and for `lorakit tune`'s "
        "pruner.",
    )
    metric_for_best: str | None = Field(
        None,
        description="Validation metric that chooses the adapter kept at the end (e.g. accuracy, f1_macro, "
        "exact_match, loss); unset = the task's default. Set it when another metric matters to "
        "you (f1_macro for unbalanced classes).",
    )
    greater_is_better: bool | None = Field(
        None,
        description="Whether a higher `metric_for_best` is better; unset = false for losses and perplexity, "
        "true otherwise. Set it only for a metric of your own whose direction lorakit cannot "
        "tell.",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop after this many evaluations without a better `metric_for_best`; unset = never stop "
        "early. Set it with many epochs to save time once validation stops improving.",
    )
    logging_steps: int = Field(
        10,
        ge=1,
        description="Log the average training loss every N optimizer steps (run log, trackers, "
        "history.jsonl). Lower it for finer loss curves.",
    )
    save_every_steps: int | None = Field(
        100,
        ge=1,
        description="Write a resumable checkpoint every N optimizer steps (and after each evaluation); null ="
        " only after evaluations. Lower it when runs are often interrupted.",
    )
    seed: int = Field(
        42,
        description="Seed of initialisation, dropout and data order: the same seed on the same machine gives "
        "the same adapter. Change it to measure run-to-run spread.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto",
        description="Where to train: `auto` = a CUDA GPU, else Apple MPS, else the CPU; or name one. Set "
        "`cpu` to keep a GPU free.",
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads torch uses for the run; unset = torch's default (one per core). Lower it to "
        "share the machine with other work.",
    )
    release_memory: bool = Field(
        True,
        description="Linux: give large freed tensors back to the system at once instead of keeping them in a "
        "heap that batches of changing shapes fragment, so memory does not creep up over a run (a"
        " little slower). Applies to the whole process; turn it off when all batches have one "
        "shape.",
    )
    score_base_model: bool = Field(
        False,
        description="Also score the test split with the adapter switched off, so metrics.json holds the "
        "before / after comparison. Turn it on to show what the adapter adds.",
    )


class OutputConfig(Section):
    """Where the run writes its artifacts."""

    dir: str = Field(
        "runs/lorakit",
        description="The run folder: adapter/, metrics.json, history.jsonl, report/, checkpoints and logs. "
        "One run per folder.",
    )
    overwrite: bool = Field(
        False,
        description="Replace an existing run folder (the CLI's --overwrite). Leave false so that a finished "
        "run is never lost by accident.",
    )
    tensorboard: bool = Field(
        True,
        description="Write TensorBoard event files under <dir>/tensorboard when `report_to` is unset. Turn it"
        " off to write less.",
    )
    report: bool = Field(
        True,
        description="Write the HTML report (metrics, loss curves, confusion matrices, samples) under "
        "<dir>/report. Turn it off for runs nobody will read, such as search trials.",
    )
    report_to: list[TrackerName] | None = Field(
        None,
        description="Experiment trackers: tensorboard (files under <dir>/tensorboard), mlflow "
        "(MLFLOW_TRACKING_URI, else a local SQLite file), wandb (offline without WANDB_API_KEY); "
        "[] = none; unset = [tensorboard] when `tensorboard` is true. mlflow and wandb need `pip "
        "install 'lorakit[track]'`.",
    )
    experiment: str = Field(
        "lorakit",
        min_length=1,
        description="The MLflow experiment / W&B project runs are logged to (with `report_to`). Set one per "
        "project to keep runs apart.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, v: Any) -> Any:
        return ([] if v == "none" else [v]) if isinstance(v, str) else v  # transformers also takes one word

    @model_validator(mode="after")
    def _trackers_installed(self) -> OutputConfig:
        missing = [
            name
            for name in self.report_to or []
            if name != "tensorboard" and importlib.util.find_spec(name) is None
        ]
        if missing:
            raise ValueError(
                f"output.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                "not installed; pip install 'lorakit[track]' or remove "
                f"{'it' if len(missing) == 1 else 'them'} from report_to"
            )
        return self

    @property
    def trackers(self) -> list[str]:
        """The trackers in use: ``report_to``, or TensorBoard alone when that is unset and
        ``tensorboard`` is on.
        """
        return (
            list(dict.fromkeys(self.report_to))
            if self.report_to is not None
            else (["tensorboard"] if self.tensorboard else [])
        )


class RunConfig(Section):
    """A whole fine-tuning run. ``data`` and ``train`` are validated with the classes of the task named by
    ``task`` (:func:`run_config_class`); this base class names the sections every run has."""

    task: str = Field(
        DEFAULT_TASK,
        description="What is learned: text-classification, image-classification, token-classification, "
        "causal-lm, preference, ... (the tasks in lorakit/tasks); it decides which `data:` and "
        "`train:` keys exist.",
    )
    data: DataConfig
    model: ModelConfig
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tune: dict[str, Any] | None = Field(
        None,
        description="The search of `lorakit tune`: search space, metric, number of trials, pruner, storage; "
        "`lorakit train` ignores it.",
    )

    @field_validator("train")
    @classmethod
    def _lora_plus_is_lora(cls, v: TrainConfig, info: ValidationInfo) -> TrainConfig:
        lora = info.data.get("lora")
        if lora is not None and lora.method != "lora" and v.lora_plus_ratio is not None:
            raise ValueError(
                f"train.lora_plus_ratio: LoRA+ speeds up LoRA's B matrices, which "
                f"{METHOD_NAMES[lora.method]} does not have; remove it, or use lora.method: lora"
            )
        return v

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain YAML-able data."""
        return self.model_dump(mode="json")
