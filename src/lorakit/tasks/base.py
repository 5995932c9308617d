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

from lorakit.config import DataConfig, ModelConfig, RunConfig


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
    #: peft's TaskType for get_peft_model (e.g. "SEQ_CLS"); None for models peft has no type for.
    peft_task_type: str | None
    #: Metric used to pick the best adapter when the config does not say.
    default_metric: str = "loss"
    #: An input for `lorakit predict`, shown in model cards.
    example_input: str = '"your input"'
    #: The lorakit command that answers with an adapter of this task (shown in model cards).
    cli_command: str = "predict"
    #: How `lorakit serve` answers: "classify" (/v1/predict) or "generate" (/v1/chat/completions).
    serve_kind: str = "classify"
    #: Inputs are bytes (images): JSON requests carry them base64-encoded or as http(s) URLs.
    binary_inputs: bool = False

    # ---- data -----------------------------------------------------------------------------------
    @abstractmethod
    def load_processor(self, model_cfg: ModelConfig, model_path: str) -> Any:
        """Load the tokenizer / image processor of the base model."""

    @abstractmethod
    def prepare(self, cfg: RunConfig, processor: Any) -> PreparedData:
        """Read, check, split and preprocess the data of a run."""

    @abstractmethod
    def preprocess(self, ds: Dataset, processor: Any, data_cfg: DataConfig, label_space: Any, *, key: str) -> Dataset:
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
    def load_model(self, model_cfg: ModelConfig, model_path: str, label_space: Any, data_cfg: DataConfig | None = None) -> tuple[torch.nn.Module, list[str]]:
        """Load the base model (shaped for ``data_cfg`` where inputs matter, e.g. image size); return it
        and the names of modules that are new (not in the checkpoint)."""

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Last touches on the LoRA-wrapped model before training or inference (e.g. memory layout)."""
        return model

    # ---- evaluation / prediction ----------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, ds: Dataset, processor: Any, data_cfg: DataConfig, label_space: Any, *, batch_size: int, device: torch.device, amp: torch.dtype | None = None, progress: Any = None, generation_samples: int = 0, max_new_tokens: int = 32) -> dict[str, Any]:
        """Metrics of ``model`` on a preprocessed split: the loss plus :meth:`compute_metrics`."""
        from lorakit.engine import evaluate_model

        logits, labels, loss = evaluate_model(model, ds, self.collate(processor, data_cfg), batch_size=batch_size, device=device, amp=amp, progress=progress)
        return {"loss": loss, **self.compute_metrics(logits, labels, label_space)}

    @abstractmethod
    def compute_metrics(self, logits: np.ndarray, labels: np.ndarray, label_space: Any) -> dict[str, Any]:
        """Metrics from gathered model outputs; scalar values are logged, others go in the report."""

    @abstractmethod
    def predict(self, model: torch.nn.Module, processor: Any, inputs: list[Any], label_space: Any, data_cfg: DataConfig, *, top_k: int = 1) -> list[dict[str, Any]]:
        """Post-processed predictions for raw inputs."""

    def usage(self, meta: dict[str, Any]) -> list[str]:
        """Python lines that load base model + adapter with plain peft (for the model card)."""
        return ["from peft import PeftModel", "# load the base model, then:", 'model = PeftModel.from_pretrained(base, "ADAPTER_DIR").eval()']

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
