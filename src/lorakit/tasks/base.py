"""The task interface: the one extension point of lorakit.

A task owns everything that depends on *what* is learned: the model class, preprocessing, the
collator, metrics and post-processing of predictions. The training loop, export and serving code
only talk to this interface and never branch on the task name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Dataset, DatasetDict

from lorakit.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig


@dataclass
class PreparedData:
    """Model-ready splits plus what the task learned about them (e.g. the label space)."""

    splits: DatasetDict
    processor: Any  # tokenizer or image processor
    label_space: Any | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """What a task must provide. Subclasses are registered in :mod:`lorakit.tasks`."""

    name: str
    #: The task's `data:` section: the common fields plus the task's own (columns, lengths, formats).
    data_config: ClassVar[type[DataConfig]] = DataConfig
    #: The task's `train:` section (a subclass of TrainConfig when the task has settings of its own).
    train_config: ClassVar[type[TrainConfig]] = TrainConfig
    #: peft's TaskType for get_peft_model (e.g. "SEQ_CLS"); None for models peft has no type for.
    peft_task_type: str | None
    #: Metric used to pick the best adapter when the config does not say.
    default_metric: str = "loss"
    #: An input for `lorakit predict`, shown in model cards.
    example_input: str = '"your input"'
    #: The lorakit command that answers with an adapter of this task (shown in model cards).
    cli_command: str = "predict"
    #: Answers are generated text (`lorakit generate`, /v1/chat/completions),
    #: not labels (`predict`, /v1/predict).
    generates: bool = False
    #: Examples carry labels from a label space learned from the training data (classification).
    labelled: bool = False
    #: Inputs are bytes (images): JSON requests carry them base64-encoded or as http(s) URLs.
    binary_inputs: bool = False
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

    @abstractmethod
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
        """Post-processed predictions for raw inputs."""

    def plan_lines(self, cfg: RunConfig, stats: dict[str, Any]) -> list[str]:
        """Task-specific lines `lorakit check` shows about the prepared data (tokens, image sizes)."""
        tok = stats.get("train_tokens")
        if not tok:
            return []
        cut_at = getattr(cfg.data, "max_length", "max_length")
        return [
            f"  tokens    mean {tok['mean']:.0f}, max {tok['max']}, {tok['truncated']:,} "
            f"train examples cut at {cut_at}"
        ]

    # ---- serving --------------------------------------------------------------------------------
    def serving_rows(self, processor: Any, data_cfg: DataConfig, inputs: list[Any]) -> list[Any]:
        """Model rows for raw request inputs, one per input (the server batches rows of many requests
        and adapters together).

        Raises:
            DataError: An input cannot be used (named by its position).
        """
        raise NotImplementedError(f"{self.name} adapters are not served from raw inputs")

    def serve_batch(
        self, model: torch.nn.Module, processor: Any, rows: list[Any], options: tuple, **adapter_kwargs: Any
    ) -> list[Any]:
        """One pass of the server's model over ``rows`` (of one or many adapters); one output per row."""
        raise NotImplementedError(f"{self.name} adapters are not served")

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
