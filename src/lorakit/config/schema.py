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
        description="Training data: a csv/json/jsonl/parquet file (or glob), a pkg:// path, "
        "or a Hub dataset name."
    )
    validation: str | None = Field(
        None,
        description="Validation data; when unset a seeded split of `train` of size "
        "`validation_size` is used.",
    )
    test: str | None = Field(
        None,
        description="Held-out test data, scored once at the end; "
        "when unset and `test_size` > 0, split from `train`.",
    )
    format: Literal["auto", "csv", "json", "jsonl", "parquet", "imagefolder", "idx", "hub"] = Field(
        "auto",
        description="Data format; `auto` decides by extension (a folder is an image folder with "
        "one sub-folder per class, `*-images-idx3-ubyte[.gz]` is MNIST-style idx), anything "
        "else without a file is a Hub name.",
    )
    hub_split: str = Field("train", description="Which split of a Hub dataset `train` names.")
    label_names: list[str] | None = Field(
        None, description="Names for integer labels 0..K-1, in order (e.g. [negative, positive])."
    )
    where: dict[str, Any] = Field(
        default_factory=dict,
        description="Keep only rows whose columns equal these values, e.g. {source: imdb}.",
    )
    validation_size: float = Field(
        0.1,
        gt=0,
        description="Share (0-1) or count (>= 1) of `train` held out for validation when "
        "`validation` is unset.",
    )
    test_size: float = Field(
        0,
        ge=0,
        description="Share (0-1) or count (>= 1) of `train` held out as a test split when "
        "`test` is unset; 0 = none.",
    )
    max_train_samples: int | None = Field(
        None, ge=1, description="Use at most this many training examples (seeded sample)."
    )
    max_eval_samples: int | None = Field(
        None, ge=1, description="Use at most this many validation and test examples each."
    )
    seed: int = Field(42, description="Seed of splits and sampling: the same seed gives the same examples.")

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
        256, ge=8, le=32768, description="Tokens per example; longer inputs are truncated."
    )
    pad_to_multiple_of: int | None = Field(
        32,
        ge=1,
        le=1024,
        description="Pad each batch to its longest example rounded up to a multiple of this, so "
        "batches come in few shapes and the memory of CPU kernels' caches and of the heap stops growing "
        "over a run (MiniLM, 60 bf16 steps: peak RSS 1611 instead of 2322 MB, 0.87x the step time; "
        "bench/train_memory.py, BENCHMARKS.md); null = exactly the longest example.",
    )


class ModelConfig(Section):
    """The pretrained base model."""

    name_or_path: str = Field(description="A local folder, a pkg:// path or a Hugging Face Hub id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub repository to run.")
    gguf_file: str | None = Field(
        None,
        description="GGUF file inside the model folder (dequantised on load); found automatically "
        "when `name_or_path` is a .gguf file or a folder with exactly one.",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the frozen base in 4 / 8 bits (QLoRA; needs a CUDA GPU and bitsandbytes)."
    )
    dropout: float | None = Field(
        0.0,
        ge=0,
        lt=1,
        description="Override every dropout probability of the base model (hidden, attention, "
        "classifier); null keeps the model's own. The default 0 halves the step time on CPUs "
        "(dropout masks are costly there), saves the masks' memory, and cost no accuracy in "
        "one-epoch LoRA runs (BENCHMARKS.md, quality).",
    )

    _location = field_validator("name_or_path")(_pkg_form("model"))


class LoraSettings(Section):
    """LoRA hyperparameters (passed to peft.LoraConfig)."""

    r: int = Field(8, ge=1, le=4096, description="Rank of the update matrices.")
    alpha: float = Field(
        16,
        gt=0,
        description="Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str | None = Field(
        None,
        description="Module name suffixes to adapt, a regex string, or `all-linear`; unset = "
        "the default for the architecture.",
    )
    layers: list[int] | None = Field(
        None,
        min_length=1,
        description="Adapt only these blocks of the model (0 = the lowest, -1 = the top one; "
        "e.g. [-3, -2, -1] for the top three); unset = every block. Fewer adapted blocks make the "
        "backward pass shorter (it stops at the lowest adapted block) at some cost in accuracy.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default",
        description="Initialisation of the update matrices: `default` (A random, B zero), "
        "`gaussian`, `pissa` (A and B from the weight's top singular vectors; exact SVD, slow "
        "on large models) or `olora` (QR). PiSSA / OLoRA move part of the base weights into the "
        "adapter while training; the saved adapter is converted to a plain LoRA adapter of rank "
        "2r that applies to the original base model.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Extra modules trained fully and saved; the task head is always added.",
    )
    batch_norm: Literal["train", "freeze"] = Field(
        "train",
        description="BatchNorm layers (CNNs): `train` trains them and saves them with the "
        "adapter (their running statistics follow the new data); `freeze` keeps the pretrained "
        "statistics and weights (pure LoRA).",
    )


class TrainConfig(Section):
    """Optimisation and evaluation schedule."""

    epochs: float = Field(3, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    batch_size: int = Field(16, ge=1, description="Examples per forward pass.")
    eval_batch_size: int | None = Field(
        None,
        ge=1,
        description="Examples per forward pass during evaluation; unset = batch_size on CPUs "
        "(larger batches only raise the memory peak there: measured +400 MB at 64 on MiniLM, "
        "BENCHMARKS.md, training speed), 4 x batch_size on GPUs.",
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    learning_rate: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Peak learning rate of AdamW; unset = the architecture's default: 1e-3 (transformers), "
        "5e-3 for the zoo's EfficientNet-Lite0 (measured: BENCHMARKS.md, quality).",
    )
    head_learning_rate: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Learning rate of the modules trained in full (the task head, and BatchNorm "
        "layers and lora.modules_to_save where there are any); unset = learning_rate.",
    )
    lora_plus_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: the B matrices learn at learning_rate x this ratio (the paper "
        "suggests 16); unset = the same rate as A.",
    )
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW weight decay (not applied to biases and norms)."
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of steps with linear warm-up.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null = none.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto",
        description="`auto` = bf16 (or fp16) on a CUDA GPU, bf16 on a CPU with native bf16 "
        "(AVX512-BF16 / AMX), fp32 otherwise; `no` = fp32.",
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding)."
    )
    gradient_checkpointing: bool | float = Field(
        False,
        description="Recompute transformer blocks' activations in the backward pass instead of keeping "
        "them (transformers models): true = every block; a share between 0 and 1 = that share of the "
        "blocks, spread evenly (memory and time in between). Less memory, slower steps (measured: "
        "BENCHMARKS.md, causal LM and DPO).",
    )

    @field_validator("gradient_checkpointing")
    @classmethod
    def _checkpointing_share(cls, v: bool | float) -> bool | float:
        if not isinstance(v, bool) and not 0 < v <= 1:
            raise ValueError("a share of the blocks must be above 0 and at most 1 (or true / false)")
        return v

    eval_every_steps: int | None = Field(
        None, ge=1, description="Evaluate every N optimizer steps; unset = at the end of each epoch."
    )
    metric_for_best: str | None = Field(
        None,
        description="Validation metric that selects the best adapter (e.g. accuracy, f1_macro, loss); "
        "unset = the task's default (accuracy for classification).",
    )
    greater_is_better: bool | None = Field(
        None,
        description="Whether a higher `metric_for_best` is better; unset = False for losses and perplexity, "
        "True otherwise.",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement."
    )
    logging_steps: int = Field(10, ge=1, description="Log the training loss every N optimizer steps.")
    save_every_steps: int | None = Field(
        100,
        ge=1,
        description="Write a resumable checkpoint every N optimizer steps (and after each "
        "evaluation); null = only after evaluations.",
    )
    seed: int = Field(42, description="Seed of initialisation, dropout and data order.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Where to train.")
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; unset = torch's default.")
    release_memory: bool = Field(
        True,
        description="Linux (glibc): tensors of 8 MiB and more are given back to the system when freed "
        "(malloc's mmap threshold fixed at 8 MiB) instead of staying in a heap that batches of changing "
        "shapes fragment, so the process's memory does not creep up during a run (measured on MiniLM, "
        "125 steps: peak RSS 2798 instead of 3561 MB, 11% fewer samples/s; BENCHMARKS.md, training "
        "speed; false for the fastest steps). Applies to the whole process.",
    )
    score_base_model: bool = Field(
        False,
        description="Also score the test split with the adapter switched off: the before / "
        "after comparison lands in metrics.json.",
    )


class OutputConfig(Section):
    """Where the run writes its artifacts."""

    dir: str = Field("runs/lorakit", description="Run directory: adapter/, metrics, report/, logs.")
    overwrite: bool = Field(False, description="Replace an existing run directory.")
    tensorboard: bool = Field(
        True, description="Write TensorBoard event files under <dir>/tensorboard (when `report_to` is unset)."
    )
    report: bool = Field(True, description="Write an HTML report with plots under <dir>/report.")
    report_to: list[TrackerName] | None = Field(
        None,
        description="Experiment trackers, the words transformers uses: tensorboard (files under "
        "<dir>/tensorboard), mlflow (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the "
        "working folder), wandb (offline without WANDB_API_KEY); [] = none; unset = "
        "[tensorboard] when `tensorboard` is true. mlflow and wandb need `pip install "
        "'lorakit[track]'`.",
    )
    experiment: str = Field(
        "lorakit",
        min_length=1,
        description="MLflow experiment / W&B project the run is logged to (with `report_to`).",
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
        description="What is learned: one of the tasks in lorakit/tasks (text-classification, "
        "image-classification, causal-lm, ...).",
    )
    data: DataConfig
    model: ModelConfig
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tune: dict[str, Any] | None = Field(
        None,
        description="The search of `lorakit tune` (search space, metric, trials; "
        "lorakit.experiments.tuning.TuneConfig checks it); `lorakit train` ignores it.",
    )

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain YAML-able data."""
        return self.model_dump(mode="json")
