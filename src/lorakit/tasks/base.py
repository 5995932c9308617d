"""The task interface: the one extension point of lorakit.

A task owns everything that depends on *what* is learned: its config sections, data preparation, the
model class, the loss, metrics, what its answers look like (the prediction record of ``lorakit
predict`` and ``/v1/predict``, or generated text), its "try it" widget in the UI, and the sections of
its report. Every stage (training, check, eval, predict, export, serve, UI) asks this interface and
never branches on the task name; everything a stage asks is declared here, with a default that either
works for every task or raises a one-line :class:`~lorakit.errors.AdapterError` naming the task and
the command that does answer for it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from pydantic import BaseModel

from lorakit.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig
from lorakit.errors import AdapterError

#: The commands a task's adapters can answer (:attr:`Task.cli_command`).
ANSWERS = ("predict", "generate")


@dataclass
class PreparedData:
    """Model-ready splits plus what the task learned about them (e.g. the label space)."""

    splits: DatasetDict
    processor: Any  # tokenizer or image processor
    label_space: Any | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerateOptions:
    """How a generating task answers one request (the same for every row of a served batch)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class ReportTable:
    """A table of a report section: ``rows`` of cells (text, numbers, or :class:`ReportImage`)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    kind: str = "table"  # what the table is (its CSS class on pages): per-class, mistakes, samples, ...


@dataclass
class ReportImage:
    """A cell showing an image example: ``reference`` is what :func:`lorakit.data.images.load_image`
    reads (a path or URL); ``text`` is shown where the image cannot be."""

    reference: str
    text: str


@dataclass
class ReportMatrix:
    """A matrix of counts with one label per row and column (a confusion matrix)."""

    title: str
    labels: list[str]
    values: list[list[int]]
    kind: str = "confusion"  # what the matrix is (its CSS class, its plot's file name)


ReportSection = ReportTable | ReportMatrix


class Task(ABC):
    """What a task must provide. Subclasses are registered in :mod:`lorakit.tasks`."""

    #: The task's name in the registry and in configs (``task:``).
    name: ClassVar[str] = ""
    #: The task's `data:` section: the common fields plus the task's own (columns, lengths, formats).
    data_config: ClassVar[type[DataConfig]] = DataConfig
    #: The task's `train:` section (a subclass of TrainConfig when the task has settings of its own).
    train_config: ClassVar[type[TrainConfig]] = TrainConfig
    #: peft's TaskType for get_peft_model (e.g. "SEQ_CLS"); None for models peft has no type for.
    peft_task_type: ClassVar[str | None] = None
    #: Metric used to pick the best adapter when the config does not say.
    default_metric: str = "loss"
    #: Metrics of this task where lower is better, besides any ``*loss*`` (see :meth:`greater_is_better`).
    lower_is_better: ClassVar[tuple[str, ...]] = ()
    #: An input for `lorakit predict`, shown in model cards.
    example_input: str = '"your input"'
    #: The one `lorakit` command these adapters answer (one of :data:`ANSWERS`): ``predict`` (a record
    #: per input: :meth:`predict`, ``/v1/predict``) or ``generate`` (text: :meth:`generate`,
    #: ``/v1/chat/completions``). Every other command and route refuses them in one line naming it.
    cli_command: ClassVar[str] = "predict"
    #: One answer of :meth:`predict` as ``/v1/predict`` returns it (its OpenAPI schema); None for tasks
    #: that answer with generated text.
    prediction_model: ClassVar[type[BaseModel] | None] = None
    #: What one input of ``/v1/predict`` is (its OpenAPI description).
    input_description: ClassVar[str] = "Texts."
    #: The UI's "try it" widget for these answers: ``text-labels``, ``image-labels``, ``text-spans``
    #: (labelled spans of the input text) or ``chat``.
    try_widget: ClassVar[str] = "text-labels"
    #: Validation metrics drawn as curves in the report (beside the loss), when an evaluation has them.
    curve_metrics: ClassVar[tuple[str, ...]] = ()
    #: Examples carry labels from a label space learned from the training data (classification).
    labelled: bool = False
    #: The transformers Auto classes of a merged model and its processor (model cards of exports).
    auto_classes: tuple[str, str] = ("AutoModel", "AutoProcessor")

    # ---- data -----------------------------------------------------------------------------------
    @abstractmethod
    def load_processor(self, model_cfg: ModelConfig, model_path: str) -> Any:
        """Load the tokenizer / image processor of the base model."""

    @abstractmethod
    def prepare(self, cfg: RunConfig, processor: Any) -> PreparedData:
        """Read, check, split and preprocess the data of a run."""

    @abstractmethod
    def preprocess(
        self, ds: Dataset, processor: Any, data_cfg: DataConfig, label_space: Any, *, key: str
    ) -> Dataset:
        """Turn raw rows (already label-encoded where needed) into model inputs."""

    def read_data(self, location: str, data_cfg: DataConfig, *, key: str) -> Dataset:
        """One data source as rows (before :meth:`columns` are checked): every file format and packaged
        or Hub data that :func:`lorakit.data.sources.read_source` reads; a task overrides it to read
        formats of its own as well (CoNLL files, say).

        Raises:
            DataError: The source cannot be read.
        """
        from lorakit.data.sources import read_source

        return read_source(location, data_cfg.format, key=key, hub_split=data_cfg.hub_split)

    @abstractmethod
    def columns(self, data_cfg: DataConfig) -> list[str]:
        """The columns every data source of this task must have."""

    @abstractmethod
    def collate(self, processor: Any, data_cfg: DataConfig, *, train: bool = False) -> Any:
        """A function turning a list of preprocessed examples into a model batch; ``train`` selects
        training-time behaviour (e.g. augmentation)."""

    # ---- model ----------------------------------------------------------------------------------
    @abstractmethod
    def load_model(
        self, model_cfg: ModelConfig, model_path: str, label_space: Any, data_cfg: DataConfig | None = None
    ) -> tuple[torch.nn.Module, list[str]]:
        """Load the base model (shaped for ``data_cfg`` where inputs matter, e.g. image size); return it
        and the names of modules that are new (not in the checkpoint)."""

    #: Tasks whose adapters :meth:`starting_adapter` may name (checked before :meth:`apply_adapter`).
    starts_from: tuple[str, ...] = ()

    def starting_adapter(self, cfg: RunConfig) -> tuple[str, str] | None:
        """``(config key, location)`` of an adapter folder the run starts from instead of a new adapter,
        or None (the default: a new adapter as ``lora:`` says). The build checks the folder (an adapter of
        a task in :attr:`starts_from`, trained on this base) and hands it to :meth:`apply_adapter`."""
        return None

    def apply_adapter(
        self, base: torch.nn.Module, cfg: RunConfig, new_modules: list[str], start: Path | None = None
    ) -> Any:
        """Wrap the base model with the trainable adapter: peft LoRA as ``cfg.lora`` says, or the checked
        folder ``start`` (see :meth:`starting_adapter`) where the task starts from one."""
        from lorakit.models.modeling import apply_lora

        return apply_lora(base, cfg.lora, task_type=self.peft_task_type, new_modules=new_modules)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Last touches on the LoRA-wrapped model before training or inference (e.g. memory layout)."""
        return model

    # ---- training -------------------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The mean training loss of a collated batch."""
        return model(**batch).loss

    def loss_with_metrics(
        self, model: torch.nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """:meth:`loss` and what the training log shows of the batch beside it (averaged over the
        micro-batches of each logged row): nothing by default; an RL task adds its KL and clip ratio."""
        return self.loss(model, batch), {}

    def rollout(
        self, model: torch.nn.Module, batch: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """The training batch made from a collated one, with the model as it is now, and its metrics.
        The identity for tasks that learn from fixed examples; an online (RL) task generates answers
        here, scores them and returns them with their advantages. Runs once per batch, under
        ``no_grad`` where the task says so, before the :meth:`updates_per_batch` optimizer steps on it."""
        return batch, {}

    def updates_per_batch(self, train_cfg: TrainConfig) -> int:
        """Optimizer steps made on each (accumulated) batch of :meth:`rollout`: 1, except for online
        tasks that reuse their generated answers (GRPO's ``num_iterations``)."""
        return 1

    def helper_adapters(self, cfg: RunConfig) -> dict[str, str]:
        """Other lorakit adapters the task uses while training (a classifier as a reward model, say), as
        ``{config key: folder}``; the recipe loads each on the run's device and hands them to
        :meth:`use_helpers`. None by default."""
        return {}

    def use_helpers(self, loaded: dict[str, Any]) -> None:
        """Receive the adapters :meth:`helper_adapters` named, loaded (``{config key: LoadedAdapter}``)."""
        return None

    def loss_units(self, batch: dict[str, Any]) -> int:
        """What :meth:`loss` averages over (here: the batch's examples); data-parallel ranks weight
        their losses by it, so that the averaged gradient is the single-process one."""
        return int(batch["labels"].shape[0])

    # ---- evaluation / prediction ----------------------------------------------------------------
    def evaluate(
        self,
        model: torch.nn.Module,
        ds: Dataset,
        processor: Any,
        cfg: RunConfig,
        label_space: Any,
        *,
        batch_size: int,
        device: torch.device,
        amp: torch.dtype | None = None,
        progress: Any = None,
    ) -> dict[str, Any]:
        """Metrics of ``model`` on a preprocessed split: the loss, :meth:`compute_metrics` and
        :meth:`example_metrics`."""
        from lorakit.data.batching import evaluate_model

        logits, labels, loss = evaluate_model(
            model,
            ds,
            self.collate(processor, cfg.data),
            batch_size=batch_size,
            device=device,
            amp=amp,
            progress=progress,
        )
        metrics = {"loss": loss, **self.compute_metrics(logits, labels, label_space)}
        return metrics | self.example_metrics(ds, processor, logits, labels, label_space)

    def example_metrics(
        self, ds: Dataset, processor: Any, logits: np.ndarray, labels: np.ndarray, label_space: Any
    ) -> dict[str, Any]:
        """What an evaluation shows of single examples (e.g. the worst mistakes); nothing by default."""
        return {}

    @abstractmethod
    def compute_metrics(self, logits: np.ndarray, labels: np.ndarray, label_space: Any) -> dict[str, Any]:
        """Metrics from gathered model outputs; scalar values are logged, others go in the report."""

    def predict(
        self,
        model: torch.nn.Module,
        processor: Any,
        inputs: list[Any],
        label_space: Any,
        data_cfg: DataConfig,
        *,
        top_k: int = 1,
    ) -> list[dict[str, Any]]:
        """Prediction records (:attr:`prediction_model`, plus the ``input``) for raw inputs, for tasks
        whose :attr:`cli_command` is ``predict``.

        Raises:
            AdapterError: These adapters answer with :meth:`generate`.
        """
        raise self.refusal("lorakit predict", f"lorakit {self.cli_command}")

    def plan_lines(self, cfg: RunConfig, stats: dict[str, Any]) -> list[str]:
        """Task-specific lines `lorakit check` shows about the prepared data: by default the training
        tokens (``stats["train_tokens"]``: mean, max and, where the task counts them, ``truncated``)."""
        tok = stats.get("train_tokens")
        if not tok:
            return []
        line = f"  tokens    mean {tok['mean']:.0f}, max {tok['max']}"
        if "truncated" in tok:
            cut_at = getattr(cfg.data, "max_length", "max_length")
            line += f", {tok['truncated']:,} train examples cut at {cut_at}"
        return [line]

    # ---- answers: the same contract for the CLI, the HTTP server and the UI ------------------------
    def refusal(self, asked: str, instead: str) -> AdapterError:
        """The one-line error of a command or route that these adapters do not answer."""
        return AdapterError(f"{asked} does not answer with {self.name} adapters; use {instead}")

    def generate(
        self, model: torch.nn.Module, processor: Any, prompts: list[str], data_cfg: DataConfig, **options: Any
    ) -> list[dict[str, Any]]:
        """Answers (``{"input", "output"}``) to user messages, for tasks whose :attr:`cli_command` is
        ``generate``; options: max_new_tokens, do_sample, temperature, top_p, seed, system.

        Raises:
            AdapterError: These adapters answer with :meth:`predict`.
        """
        raise self.refusal("lorakit generate", f"lorakit {self.cli_command}")

    def predict_line(self, record: dict[str, Any]) -> str:
        """One record of :meth:`predict` as `lorakit predict` prints it without ``--json``."""
        import json

        return json.dumps(record, ensure_ascii=False)

    def decode_inputs(self, items: list[str]) -> list[Any]:
        """``/v1/predict`` inputs (JSON strings) as :meth:`serving_rows` takes them; texts stay texts.

        Raises:
            DataError: An input cannot be read (named by its position).
        """
        return list(items)

    def serving_records(
        self, inputs: list[Any], rows: list[Any], outputs: list[Any], label_space: Any, *, top_k: int
    ) -> list[dict[str, Any]]:
        """Prediction records (:attr:`prediction_model`) from the server's outputs for ``rows``.

        Raises:
            AdapterError: These adapters answer with generated text.
        """
        raise self.refusal("/v1/predict", "/v1/chat/completions")

    def chat_prompt_ids(
        self, tokenizer: Any, data_cfg: DataConfig, messages: list[dict[str, str]]
    ) -> list[int]:
        """A conversation (OpenAI-style messages) as the token ids of the prompt for the next answer.

        Raises:
            AdapterError: These adapters answer with :meth:`predict`.
        """
        raise self.refusal("chat", "/v1/predict")

    def generate_ids(
        self, model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], **options: Any
    ) -> list[str]:
        """Greedy (or sampled) answers for tokenized prompts, stopping at the end of the turn.

        Raises:
            AdapterError: These adapters do not generate text.
        """
        raise self.refusal("text generation", f"lorakit {self.cli_command}")

    def greater_is_better(self, metric: str) -> bool:
        """Whether a higher ``metric`` is a better adapter (best-adapter selection, ``lorakit tune``)."""
        return "loss" not in metric and metric not in self.lower_is_better

    # ---- report -----------------------------------------------------------------------------------
    def report_sections(self, split: str, metrics: dict[str, Any], label_space: Any) -> list[ReportSection]:
        """What the report and the UI's run page show of one evaluated split beyond its scalar metrics
        (matrices, per-class tables, mistakes, samples); nothing by default."""
        return []

    # ---- serving --------------------------------------------------------------------------------
    def serving_rows(self, processor: Any, data_cfg: DataConfig, inputs: list[Any]) -> list[Any]:
        """Model rows for raw request inputs, one per input (the server batches rows of many requests
        and adapters together).

        Raises:
            DataError: An input cannot be used (named by its position).
        """
        raise self.refusal("/v1/predict", "/v1/chat/completions")

    def serve_batch(
        self, model: torch.nn.Module, processor: Any, rows: list[Any], options: Any, **adapter_kwargs: Any
    ) -> list[Any]:
        """One pass of the server's model over ``rows`` (of one or many adapters); one output per row.
        ``options`` is what the request asked (:class:`GenerateOptions` for generating tasks)."""
        raise self.refusal("serving", f"lorakit {self.cli_command}")

    def usage(self, meta: dict[str, Any]) -> list[str]:
        """Python lines that load base model + adapter with plain peft (for the model card)."""
        return [
            "from peft import PeftModel",
            "# load the base model, then:",
            'model = PeftModel.from_pretrained(base, "ADAPTER_DIR").eval()',
        ]

    # ---- export ---------------------------------------------------------------------------------
    #: Dynamic ONNX axes of every model input (e.g. {0: "batch", 1: "sequence"}); None: no ONNX export.
    onnx_axes: ClassVar[dict[int, str] | None] = None

    @abstractmethod
    def export_batches(self, processor: Any, data_cfg: DataConfig) -> list[dict[str, torch.Tensor]]:
        """Two or more model input batches of different shapes to check an export against."""

    def save_merged(self, model: torch.nn.Module, folder: Path, loaded: Any) -> None:
        """Write a merged model (and its processor) in Hugging Face format into ``folder``."""
        model.save_pretrained(str(folder), safe_serialization=True)
        loaded.processor.save_pretrained(str(folder))

    @abstractmethod
    def load_merged(self, folder: Path, loaded: Any) -> torch.nn.Module:
        """Load a model :meth:`save_merged` wrote, the way a user would (plain transformers Auto class)."""

    def encode_labels(self, ds: Dataset, data_cfg: DataConfig, label_space: Any, *, key: str) -> Dataset:
        """Map raw labels to ids for a new dataset (evaluation files); identity for unlabelled tasks."""
        return ds
