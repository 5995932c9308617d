"""What every classification task shares: label encoding, metrics, label counts and top-k results."""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import ClassLabel, Dataset
from pydantic import BaseModel, Field

from lorakit.config.schema import DataConfig
from lorakit.data.batching import column_values
from lorakit.data.labels import LabelSpace
from lorakit.errors import DataError
from lorakit.tasks.base import ReportImage, ReportMatrix, ReportSection, ReportTable, Task
from lorakit.tasks.metrics import classification_metrics


def pad_rows(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack per-row tensors; 1-D rows of different lengths are right-padded (ids with ``pad_id``,
    masks and type ids with 0)."""
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
            continue
        width = max(v.shape[0] for v in values)
        fill = pad_id if key == "input_ids" else 0
        padded = torch.full((len(values), width), fill, dtype=values[0].dtype)
        for i, v in enumerate(values):
            padded[i, : v.shape[0]] = v
        out[key] = padded
    return out


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="The label's probability.")


class Prediction(BaseModel):
    """The most likely label of one input, its probability, and the ``top_k`` most likely labels."""

    label: str
    score: float = Field(description="The label's probability.")
    top_k: list[LabelScore]


class ClassificationTask(Task):
    """A task with one label per example, from a fixed label space learned from the training data."""

    default_metric = "accuracy"
    labelled = True
    prediction_model = Prediction
    curve_metrics = ("accuracy", "f1_macro")

    def check_rows(self, ds: Dataset, data_cfg: DataConfig, *, key: str) -> None:
        """Reject unusable inputs before labels are encoded (e.g. empty texts); nothing by default."""

    def encode_labels(
        self, ds: Dataset, data_cfg: DataConfig, label_space: LabelSpace, *, key: str
    ) -> Dataset:
        self.check_rows(ds, data_cfg, key=key)
        unknown = label_space.unknown(column_values(ds, data_cfg.label_column))
        if unknown:
            raise DataError(
                f"{key}: labels {unknown[:5]} are not among the training labels "
                f"{list(label_space.labels)[:10]}; add examples of them to the training data "
                "or remove those rows"
            )
        col = data_cfg.label_column
        ds = ds.map(
            lambda b: {"labels": [label_space.encode(v) for v in b[col]]}, batched=True, desc="labels"
        )
        return ds.cast_column("labels", ClassLabel(names=list(label_space.labels)))

    @staticmethod
    def label_counts(splits: dict[str, Dataset], space: LabelSpace) -> dict[str, dict[str, int]]:
        """Examples per label name in each split."""
        return {
            k: dict(sorted(Counter(space.labels[i] for i in v["labels"]).items())) for k, v in splits.items()
        }

    def compute_metrics(
        self, logits: np.ndarray, labels: np.ndarray, label_space: LabelSpace
    ) -> dict[str, Any]:
        return classification_metrics(logits.argmax(-1), labels, label_space.labels)

    #: How many of the most confident mistakes an evaluation keeps (report and UI).
    mistakes_kept: ClassVar[int] = 12

    def example_metrics(
        self, ds: Dataset, processor: Any, logits: np.ndarray, labels: np.ndarray, label_space: LabelSpace
    ) -> dict[str, Any]:
        names = label_space.labels
        return {
            "mistakes": self.mistakes(ds, processor, logits, labels, label_space),
            # every example's true and predicted label, in split order: what `lorakit compare` pairs
            "predictions": {
                "true": [names[int(i)] for i in labels],
                "predicted": [names[int(i)] for i in logits.argmax(-1)],
            },
        }

    def mistakes(
        self, ds: Dataset, processor: Any, logits: np.ndarray, labels: np.ndarray, label_space: LabelSpace
    ) -> list[dict[str, Any]]:
        """The wrong predictions with the highest probability, most confident first: the example (as
        :meth:`describe` shows it), its true and predicted label and that label's probability."""
        z = logits - logits.max(-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        pred = probs.argmax(-1)
        wrong = np.nonzero(pred != labels)[0]
        order = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][: self.mistakes_kept]
        return [
            self.describe(ds[int(i)], processor)
            | {
                "row": int(i),
                "true": label_space.labels[int(labels[i])],
                "predicted": label_space.labels[int(pred[i])],
                "probability": float(probs[i, pred[i]]),
            }
            for i in order
        ]

    def describe(self, row: dict[str, Any], processor: Any) -> dict[str, str]:
        """A preprocessed example as a person reads it: ``{"input": text}`` (image tasks add ``"image"``,
        the reference a thumbnail is made from)."""
        return {"input": f"row with {', '.join(row)}"}

    def serve_batch(
        self, model: torch.nn.Module, processor: Any, rows: list[Any], options: tuple, **adapter_kwargs: Any
    ) -> list[Any]:
        """Logits (one tensor per row) for rows :meth:`serving_rows` made,
        padded and stacked into one batch."""
        device = next(model.parameters()).device
        batch = pad_rows(rows, getattr(processor, "pad_token_id", None) or 0)
        logits = model(**{k: v.to(device) for k, v in batch.items()}, **adapter_kwargs).logits
        return list(logits.float().cpu())

    def serving_records(
        self, inputs: list[Any], rows: list[Any], outputs: list[Any], label_space: LabelSpace, *, top_k: int
    ) -> list[dict[str, Any]]:
        return self.top_k(torch.stack(outputs), ["" for _ in outputs], label_space, top_k)

    def predict_line(self, record: dict[str, Any]) -> str:
        text = record["input"] if len(record["input"]) <= 60 else record["input"][:57] + "..."
        return "  ".join(f"{a['label']} {a['score']:.3f}" for a in record["top_k"]) + f"\t{text}"

    def report_sections(self, split: str, metrics: dict[str, Any], label_space: Any) -> list[ReportSection]:
        """The confusion matrix, per-class precision / recall / F1, and the most confident mistakes."""
        out: list[ReportSection] = []
        if metrics.get("confusion_matrix") and label_space is not None:
            out.append(
                ReportMatrix(
                    f"Confusion matrix: {split}", list(label_space.labels), metrics["confusion_matrix"]
                )
            )
        if metrics.get("per_class"):
            rows = [
                [name, v["precision"], v["recall"], v["f1"], v["support"]]
                for name, v in metrics["per_class"].items()
            ]
            out.append(
                ReportTable(
                    f"Per class: {split}",
                    ["class", "precision", "recall", "F1", "support"],
                    rows,
                    "per-class",
                )
            )
        if metrics.get("mistakes"):
            rows = [
                [
                    ReportImage(m["image"], m["input"]) if m.get("image") else m["input"],
                    m["true"],
                    m["predicted"],
                    m["probability"],
                ]
                for m in metrics["mistakes"]
            ]
            out.append(
                ReportTable(
                    f"Most confident mistakes: {split}",
                    ["example", "true", "predicted", "probability"],
                    rows,
                    "mistakes",
                )
            )
        return out

    @staticmethod
    def top_k(
        logits: torch.Tensor, shown: list[str], label_space: LabelSpace, top_k: int
    ) -> list[dict[str, Any]]:
        """Prediction records (best label, its probability, the k most likely) for a batch of logits."""
        k = max(1, min(top_k, label_space.num_labels))
        top = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
        return [
            {
                "input": item,
                "label": label_space.labels[idx[0]],
                "score": vals[0],
                "top_k": [
                    {"label": label_space.labels[i], "score": v} for v, i in zip(vals, idx, strict=True)
                ],
            }
            for item, vals, idx in zip(shown, top.values.tolist(), top.indices.tolist(), strict=True)
        ]
