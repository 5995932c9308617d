"""What every classification task shares: label encoding, metrics, label counts and top-k results."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset

from lorakit.config import DataConfig
from lorakit.errors import DataError
from lorakit.labels import LabelSpace
from lorakit.metrics import classification_metrics
from lorakit.tasks.base import Task


class ClassificationTask(Task):
    """A task with one label per example, from a fixed label space learned from the training data."""

    default_metric = "accuracy"

    def check_rows(self, ds: Dataset, data_cfg: DataConfig, *, key: str) -> None:
        """Reject unusable inputs before labels are encoded (e.g. empty texts); nothing by default."""

    def encode_labels(self, ds: Dataset, data_cfg: DataConfig, label_space: LabelSpace, *, key: str) -> Dataset:
        self.check_rows(ds, data_cfg, key=key)
        unknown = label_space.unknown(ds[data_cfg.label_column])
        if unknown:
            raise DataError(
                f"{key}: labels {unknown[:5]} are not among the training labels {list(label_space.labels)[:10]}; "
                "add examples of them to the training data or remove those rows"
            )
        col = data_cfg.label_column
        ds = ds.map(lambda b: {"labels": [label_space.encode(v) for v in b[col]]}, batched=True, desc="labels")
        return ds.cast_column("labels", ClassLabel(names=list(label_space.labels)))

    @staticmethod
    def label_counts(splits: dict[str, Dataset], space: LabelSpace) -> dict[str, dict[str, int]]:
        """Examples per label name in each split."""
        return {k: dict(sorted(Counter(space.labels[i] for i in v["labels"]).items())) for k, v in splits.items()}

    def compute_metrics(self, logits: np.ndarray, labels: np.ndarray, label_space: LabelSpace) -> dict[str, Any]:
        return classification_metrics(logits.argmax(-1), labels, label_space.labels)

    def serving_rows(self, processor: Any, data_cfg: DataConfig, inputs: list[Any]) -> list[dict[str, torch.Tensor]]:
        """Model inputs for raw request inputs, one dict of unbatched tensors per input (the server
        pads and stacks rows of many requests and adapters into one batch).

        Raises:
            DataError: An input cannot be used (named by its position).
        """
        raise NotImplementedError

    @staticmethod
    def top_k(logits: torch.Tensor, shown: list[str], label_space: LabelSpace, top_k: int) -> list[dict[str, Any]]:
        """Prediction records (best label, its probability, the k most likely) for a batch of logits."""
        k = max(1, min(top_k, label_space.num_labels))
        top = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
        return [
            {
                "input": item,
                "label": label_space.labels[idx[0]],
                "score": vals[0],
                "top_k": [{"label": label_space.labels[i], "score": v} for v, i in zip(vals, idx, strict=True)],
            }
            for item, vals, idx in zip(shown, top.values.tolist(), top.indices.tolist(), strict=True)
        ]
