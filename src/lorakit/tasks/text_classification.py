"""Text classification (sentiment, topic, intent, ...): one label per text or text pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from datasets import Dataset
from pydantic import Field, model_validator

from lorakit.config.schema import ModelConfig, RunConfig, TokenizedDataConfig
from lorakit.data.batching import column_values
from lorakit.data.labels import LabelSpace
from lorakit.data.sources import build_splits
from lorakit.errors import DataError, ModelError
from lorakit.models.modeling import (
    load_base_config,
    load_tokenizer,
    new_module_names,
    quiet_transformers,
)
from lorakit.tasks.base import PreparedData
from lorakit.tasks.classification import ClassificationTask

#: Columns of a preprocessed row that are not model inputs (the collator leaves them out).
NOT_MODEL_INPUTS = ("length", "input_text")


def head_tail(seq: list[int], max_len: int) -> list[int]:
    """Keep the first quarter of ``max_len`` tokens and fill the rest from the end.

    The first token ([CLS]) and the last ([SEP]) survive, so the cut sequence is still well formed.
    """
    if len(seq) <= max_len:
        return seq
    head = max_len // 4
    return seq[:head] + seq[len(seq) - (max_len - head) :]


class TextClassificationData(TokenizedDataConfig):
    """Texts (or text pairs) with one label each."""

    text_column: str = Field("text", description="Column with the input text.")
    text_pair_column: str | None = Field(
        None, description="Optional second text column (sentence-pair tasks)."
    )
    label_column: str = Field("label", description="Column with the label (strings or integers).")
    truncation: Literal["head", "tail", "head_tail"] | None = Field(
        None,
        description="Which tokens a long input keeps: its start, its end, or the first quarter "
        "of max_length from the start and the rest from the end (long reviews often end with the "
        "verdict); unset = head_tail for single texts, head for text pairs.",
    )

    @model_validator(mode="after")
    def _pairs_truncate_at_one_end(self) -> TextClassificationData:
        if self.truncation == "head_tail" and self.text_pair_column:
            raise ValueError(
                "data.truncation: head_tail works on single texts; use head or tail with text_pair_column"
            )
        return self


def encode_texts(
    tokenizer: Any, texts: list[str], pairs: list[str] | None, data_cfg: TextClassificationData
) -> dict[str, list[list[int]]]:
    """Tokenize with the run's truncation rule; training, evaluation and prediction all come here."""
    max_len = data_cfg.max_length
    mode = data_cfg.truncation or ("head" if pairs else "head_tail")
    if mode == "head_tail":
        enc = dict(
            tokenizer(texts, truncation=False, verbose=False)
        )  # cut by head_tail; no "longer than the maximum" warning
        return {key: [head_tail(r, max_len) for r in rows] for key, rows in enc.items()}
    tokenizer.truncation_side = "left" if mode == "tail" else "right"
    return dict(tokenizer(texts, pairs, truncation=True, max_length=max_len))


class TextClassification(ClassificationTask):
    name = "text-classification"
    data_config = TextClassificationData
    peft_task_type = "SEQ_CLS"
    auto_classes = ("AutoModelForSequenceClassification", "AutoTokenizer")

    # ---- data -----------------------------------------------------------------------------------
    def load_processor(self, model_cfg: ModelConfig, model_path: str) -> Any:
        tok = load_tokenizer(model_cfg, model_path)
        if tok.pad_token is None:
            # Decoder-only models often ship without a pad token; padding positions are masked anyway.
            tok.pad_token = tok.eos_token or tok.unk_token
        return tok

    def check_rows(self, ds: Dataset, data_cfg: TextClassificationData, *, key: str) -> None:
        for col in filter(None, [data_cfg.text_column, data_cfg.text_pair_column]):
            values = column_values(ds, col)
            bad = [i for i, t in enumerate(values) if not isinstance(t, str) or not t.strip()]
            if bad:
                raise DataError(
                    f"{key}: {len(bad)} row(s) have empty or non-text '{col}' (first at row {bad[0]}); "
                    "remove them or fill them in"
                )

    def columns(self, data_cfg: TextClassificationData) -> list[str]:
        d = data_cfg
        return [d.text_column, d.label_column] + ([d.text_pair_column] if d.text_pair_column else [])

    def prepare(self, cfg: RunConfig, processor: Any) -> PreparedData:
        d = cfg.data
        columns = self.columns(d)
        space_box: dict[str, LabelSpace] = {}
        notes: list[str] = []

        def encode(ds: Dataset, key: str) -> Dataset:
            if "space" not in space_box:  # the first source read is train: it defines the label space
                self.check_rows(ds, d, key=key)
                space_box["space"] = LabelSpace.infer(
                    column_values(ds, d.label_column), d.label_names, key=key, notes=notes
                )
            return self.encode_labels(ds, d, space_box["space"], key=key)

        raw = build_splits(d, columns=columns, encode=encode, stratify="labels")
        space = space_box["space"]
        splits = {
            name: self.preprocess(ds, processor, d, space, key=f"data.{name}") for name, ds in raw.items()
        }
        stats: dict[str, Any] = {
            "sizes": {k: len(v) for k, v in raw.items()},
            "columns": raw["train"].column_names,
        }
        stats["label_counts"] = self.label_counts(raw, space)
        stats["warnings"] = notes
        lengths = np.asarray(column_values(splits["train"], "length"))
        stats["train_tokens"] = {
            "mean": float(lengths.mean()),
            "max": int(lengths.max()),
            "truncated": int((lengths >= d.max_length).sum()),
        }
        from datasets import DatasetDict

        return PreparedData(DatasetDict(splits), processor, space, stats)

    def preprocess(
        self, ds: Dataset, processor: Any, data_cfg: TextClassificationData, label_space: Any, *, key: str
    ) -> Dataset:
        text, pair = data_cfg.text_column, data_cfg.text_pair_column

        def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
            enc = encode_texts(processor, batch[text], batch[pair] if pair else None, data_cfg)
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            # the text as written, for the mistakes tables (re-decoded tokens read "i ' ve", "< br / >")
            pairs = batch[pair] if pair else [None] * len(batch[text])
            enc["input_text"] = [
                str(t) if p is None else f"{t}\n\n{p}" for t, p in zip(batch[text], pairs, strict=True)
            ]
            return enc

        keep = {"labels"}
        drop = [c for c in ds.column_names if c not in keep]
        # datasets fingerprints this map: re-running the same data + tokenizer reuses the cached result.
        return ds.map(tokenize, batched=True, remove_columns=drop, desc=f"tokenize {key}")

    def collate(self, processor: Any, data_cfg: TextClassificationData, *, train: bool = False) -> Any:
        from transformers import DataCollatorWithPadding

        pad = DataCollatorWithPadding(processor, pad_to_multiple_of=data_cfg.pad_to_multiple_of)

        def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            # Dynamic padding: each batch is padded to its own
            # longest example (rounded up to data.pad_to_multiple_of).
            return pad([{k: v for k, v in ex.items() if k not in NOT_MODEL_INPUTS} for ex in examples])

        return collate_fn

    # ---- model ----------------------------------------------------------------------------------
    def load_model(
        self,
        model_cfg: ModelConfig,
        model_path: str,
        label_space: LabelSpace,
        data_cfg: TextClassificationData | None = None,
    ) -> tuple[torch.nn.Module, list[str]]:
        from transformers import AutoModelForSequenceClassification

        config = load_base_config(
            model_cfg,
            model_path,
            num_labels=label_space.num_labels,
            id2label=label_space.id2label,
            label2id=label_space.label2id,
        )
        try:
            with quiet_transformers():
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    model_path,
                    config=config,
                    # a checkpoint with a head of another size gets a fresh head
                    ignore_mismatched_sizes=True,
                    output_loading_info=True,
                    revision=model_cfg.revision,
                    trust_remote_code=model_cfg.trust_remote_code,
                )
        except ValueError as exc:
            if (
                "Unrecognized configuration class" in str(exc)
                or "sequence classification" in str(exc).lower()
            ):
                raise ModelError(
                    f"model.name_or_path: '{model_path}' has no sequence-classification variant "
                    "(its architecture does not fit task text-classification); pick a text "
                    "encoder such as BERT or RoBERTa"
                ) from None
            raise ModelError(
                f"model.name_or_path: could not load '{model_path}': {str(exc).splitlines()[0][:200]}"
            ) from None
        if model.config.pad_token_id is None:
            model.config.pad_token_id = getattr(model.config, "eos_token_id", None) or 0
        return model, new_module_names(info.get("missing_keys", []), info.get("mismatched_keys", []))

    # ---- export ---------------------------------------------------------------------------------
    onnx_axes: ClassVar[dict[int, str] | None] = {0: "batch", 1: "sequence"}

    def export_batches(
        self, processor: Any, data_cfg: TextClassificationData
    ) -> list[dict[str, torch.Tensor]]:
        texts = [
            "One of the best films I have seen in years: moving, funny and beautifully acted.",
            "Dull.",
            "A tedious, badly written mess; the plot goes nowhere and the acting is wooden.",
        ]
        pairs = (
            ["A second text to compare.", "No.", "Another, longer second text of the pair."]
            if data_cfg.text_pair_column
            else None
        )

        def batch(rows: slice) -> dict[str, torch.Tensor]:
            args = (texts[rows], pairs[rows]) if pairs else (texts[rows],)
            return dict(
                processor(
                    *args, padding=True, truncation=True, max_length=data_cfg.max_length, return_tensors="pt"
                )
            )

        return [batch(slice(0, 3)), batch(slice(1, 2)), batch(slice(1, 3))]

    def load_merged(self, folder: Path, loaded: Any) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        with quiet_transformers():
            return AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()

    def usage(self, meta: dict[str, Any]) -> list[str]:
        where = meta["base_model"].get("resolved") or meta["base_model"]["name_or_path"]
        n = len((meta.get("label_space") or {}).get("id2label", {})) or 2
        return [
            "from peft import PeftModel",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f"base = AutoModelForSequenceClassification.from_pretrained({where!r}, num_labels={n})",
            'model = PeftModel.from_pretrained(base, "ADAPTER_DIR").eval()',
            f"tokenizer = AutoTokenizer.from_pretrained({where!r})",
        ]

    def describe(self, row: dict[str, Any], processor: Any) -> dict[str, str]:
        if "input_text" in row:  # as written in the data
            return {"input": row["input_text"][:600]}
        return {"input": processor.decode(row["input_ids"], skip_special_tokens=True)[:600]}

    # ---- prediction -----------------------------------------------------------------------------
    @torch.no_grad()
    def serving_rows(
        self, processor: Any, data_cfg: TextClassificationData, inputs: list[Any]
    ) -> list[dict[str, torch.Tensor]]:
        for i, t in enumerate(inputs):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"inputs[{i}]: expected a non-empty text")
        enc = encode_texts(processor, list(inputs), None, data_cfg)
        return [{k: torch.tensor(v[i]) for k, v in enc.items()} for i in range(len(inputs))]

    def predict(
        self,
        model: torch.nn.Module,
        processor: Any,
        inputs: list[Any],
        label_space: LabelSpace,
        data_cfg: TextClassificationData,
        *,
        top_k: int = 1,
        batch_size: int = 32,
    ) -> list[dict[str, Any]]:
        device = next(model.parameters()).device
        results: list[dict[str, Any]] = []
        collate = self.collate(processor, data_cfg)
        for start in range(0, len(inputs), batch_size):
            chunk = [str(t) for t in inputs[start : start + batch_size]]
            enc = encode_texts(processor, chunk, None, data_cfg)
            batch = collate([{k: v[i] for k, v in enc.items()} for i in range(len(chunk))])
            results += self.top_k(
                model(**{k: v.to(device) for k, v in batch.items()}).logits, chunk, label_space, top_k
            )
        return results
