"""Token classification (named entities, and any other tag per word): BIO / IOB2 tags on a text encoder.

Data comes in one of three shapes (each source is read on its own):

- rows with a list of words (``data.tokens_column``) and a list of as many tags (``data.tags_column``),
  in json / jsonl / parquet;
- CoNLL files (``.conll``, ``.iob``, ``.bio``, or ``data.format: conll``): one word per line with its tag
  in the last column, a blank line between sentences, ``-DOCSTART-`` lines skipped;
- jsonl rows with a text (``data.text_column``) and its entities as character spans
  (``data.entities_column``: ``[{"start", "end", "label"}]``), split into words at white space and
  punctuation and tagged ``B-label`` / ``I-label``.

The tags seen in the training data are the label space. Sub-words: a word's tag goes on its first
sub-word token; the other sub-words and the special tokens are left out of the loss and the metrics
(``-100``), or, with ``data.label_all_subwords``, take the word's tag (``B-`` as ``I-``). Metrics are
entity-level, as the CoNLL shared tasks score them (``seqeval``): precision, recall and F1 over exact
entity matches, micro-averaged and per entity type, beside the accuracy over words. Predictions are the
entities of a text with their character spans and a score (the mean probability of their words' tags).
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from pydantic import BaseModel, Field

from lorakit.config.schema import ModelConfig, RunConfig, TokenizedDataConfig
from lorakit.data.batching import column_values
from lorakit.data.labels import LabelSpace
from lorakit.data.sources import build_splits
from lorakit.errors import DataError, LorakitError, ModelError
from lorakit.files.paths import resolve_location
from lorakit.models.modeling import (
    load_base_config,
    load_tokenizer,
    new_module_names,
    quiet_transformers,
)
from lorakit.tasks.base import PreparedData, ReportSection, ReportTable, Task

IGNORE = -100  # sub-words and special tokens: no loss, no metric
WORD = re.compile(r"\w+|[^\w\s]")  # how a raw text is split into words (span rows, predict, serve)
CONLL_SUFFIXES = (".conll", ".iob", ".bio")


class TokenClassificationData(TokenizedDataConfig):
    """Words and their BIO tags; see the task's description for the three shapes data can come in."""

    format: Literal["auto", "csv", "json", "jsonl", "parquet", "conll", "hub"] = Field(
        "auto",
        description="How to read the data files: by extension (auto; .conll/.iob/.bio are CoNLL), "
        "or conll for word-per-line files of another extension.",
    )
    tokens_column: str = Field("tokens", description="Column with the list of words of each example.")
    tags_column: str = Field("tags", description="Column with the list of tags, one per word (B-X, I-X, O).")
    text_column: str = Field("text", description="Column with the text, for rows given as character spans.")
    entities_column: str = Field(
        "entities", description="Column with the entities [{start, end, label}] of rows given as spans."
    )
    label_all_subwords: bool = Field(
        False,
        description="Give every sub-word of a word its tag (B- as I-) instead of scoring the first only.",
    )


class Entity(BaseModel):
    label: str = Field(description="The entity type (the tag without B- / I-).")
    text: str = Field(description="The entity as it stands in the input.")
    start: int = Field(description="Character offset of its first character in the input.")
    end: int = Field(description="Character offset just after its last character.")
    score: float = Field(description="Mean probability of its words' tags.")


class TokenPrediction(BaseModel):
    """The entities found in one input text, in reading order."""

    entities: list[Entity]


# ---- reading ---------------------------------------------------------------------------------------------


def read_conll(path: Path, *, key: str) -> list[tuple[list[str], list[str]]]:
    """Sentences of a CoNLL file as (words, tags): a word per line, its tag in the last column.

    Raises:
        DataError: A line with a single column, or a file without sentences (named by line).
    """
    sentences, words, tags = [], [], []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            parts = line.split()
            if not parts or parts[0] == "-DOCSTART-":
                if words:
                    sentences.append((words, tags))
                words, tags = [], []
                continue
            if len(parts) < 2:
                raise DataError(
                    f"{key}: '{path}' line {n}: expected a word and its tag separated by white space, "
                    f"found {line.strip()[:60]!r}"
                )
            words.append(parts[0])
            tags.append(parts[-1])
    if words:
        sentences.append((words, tags))
    if not sentences:
        raise DataError(
            f"{key}: '{path}' holds no sentences; a word and its tag per line, a blank line between"
        )
    return sentences


def split_words(text: str) -> list[tuple[str, int, int]]:
    """``(word, start, end)`` of a raw text: runs of word characters, and each punctuation mark."""
    return [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def spans_to_tags(
    text: str, entities: list[dict[str, Any]], *, key: str, row: int
) -> tuple[list[str], list[str]]:
    """A text with character-span entities as words and BIO tags (a word inside an entity is tagged)."""
    words = split_words(text)
    tags = ["O"] * len(words)
    for e in sorted(entities, key=lambda e: e.get("start", 0)):
        try:
            start, end, label = int(e["start"]), int(e["end"]), str(e["label"])
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"{key}: row {row}: an entity needs start, end and label, found {str(e)[:80]}"
            ) from None
        inside = [i for i, (_, s, t) in enumerate(words) if s < end and t > start]
        for j, i in enumerate(inside):
            tags[i] = f"{'B' if j == 0 else 'I'}-{label}"
    return [w for w, _, _ in words], tags


def check_tags(tags: list[Any], *, key: str, row: int) -> None:
    for t in tags:
        if not isinstance(t, str) or not (t == "O" or (len(t) > 2 and t[:2] in ("B-", "I-"))):
            raise DataError(
                f"{key}: row {row}: tag {t!r} is not BIO; use O, B-<type> or I-<type> "
                "(integer tags: name them in data.label_names)"
            )


def entities_of(tags: list[str]) -> list[tuple[str, int, int]]:
    """``(type, first word, last word + 1)`` of the entities in a BIO tag sequence (an I- without a
    B- before it starts an entity, as seqeval reads IOB1)."""
    out: list[tuple[str, int, int]] = []
    for i, t in enumerate(tags):
        kind = t[2:] if t != "O" else None
        if kind and (t.startswith("B-") or not out or out[-1][0] != kind or out[-1][2] != i):
            out.append((kind, i, i + 1))
        elif kind:
            out[-1] = (kind, out[-1][1], i + 1)
    return out


# ---- the task --------------------------------------------------------------------------------------------


class TokenClassification(Task):
    name = "token-classification"
    data_config = TokenClassificationData
    peft_task_type = "TOKEN_CLS"
    default_metric = "entity_f1"
    labelled = True
    prediction_model = TokenPrediction
    try_widget = "text-spans"
    curve_metrics = ("entity_f1", "word_accuracy")
    auto_classes = ("AutoModelForTokenClassification", "AutoTokenizer")
    example_input = '"Ada Lovelace was born in London."'
    onnx_axes: ClassVar[dict[int, str] | None] = {0: "batch", 1: "sequence"}

    # ---- data -----------------------------------------------------------------------------------
    def load_processor(self, model_cfg: ModelConfig, model_path: str) -> Any:
        tok = load_tokenizer(model_cfg, model_path)
        if not tok.is_fast:
            raise ModelError(
                f"model.name_or_path: '{model_path}' has no fast tokenizer, which token classification "
                "needs to map sub-words back to words; pick a model with a tokenizer.json"
            )
        return tok

    def read_data(self, location: str, data_cfg: TokenClassificationData, *, key: str) -> Dataset:
        """Rows of words and tags, from CoNLL files, word/tag rows, or text + span rows."""
        d = data_cfg
        try:
            files = sorted(glob.glob(str(Path(resolve_location(location, what=key)).expanduser())))
        except LorakitError as exc:
            raise DataError(str(exc)) from None
        if files and (
            d.format == "conll" or (d.format == "auto" and files[0].lower().endswith(CONLL_SUFFIXES))
        ):
            sentences = [s for f in files for s in read_conll(Path(f), key=key)]
            return Dataset.from_dict(
                {d.tokens_column: [w for w, _ in sentences], d.tags_column: [t for _, t in sentences]}
            )
        if d.format == "conll":
            raise DataError(f"{key}: file '{location}' does not exist; check the path")
        ds = super().read_data(location, d, key=key)
        cols = ds.column_names
        if d.tokens_column not in cols and d.text_column in cols and d.entities_column in cols:
            pairs = [
                spans_to_tags(text, ents or [], key=key, row=i)
                for i, (text, ents) in enumerate(
                    zip(column_values(ds, d.text_column), column_values(ds, d.entities_column), strict=True)
                )
            ]
            return Dataset.from_dict(
                {d.tokens_column: [w for w, _ in pairs], d.tags_column: [t for _, t in pairs]}
            )
        return ds

    def columns(self, data_cfg: TokenClassificationData) -> list[str]:
        return [data_cfg.tokens_column, data_cfg.tags_column]

    def _named_tags(self, ds: Dataset, d: TokenClassificationData, *, key: str) -> Dataset:
        """The tags as BIO strings (integer tags named by ``data.label_names``), checked row by row."""
        words, tags = column_values(ds, d.tokens_column), column_values(ds, d.tags_column)
        names = d.label_names
        out = []
        for i, (w, t) in enumerate(zip(words, tags, strict=True)):
            if not isinstance(w, list) or not isinstance(t, list) or len(w) != len(t) or not w:
                raise DataError(
                    f"{key}: row {i}: '{d.tokens_column}' and '{d.tags_column}' must be non-empty lists of "
                    f"the same length, found {len(w) if isinstance(w, list) else type(w).__name__} words "
                    f"and {len(t) if isinstance(t, list) else type(t).__name__} tags"
                )
            if names and all(isinstance(x, int) for x in t):
                t = [names[x] if 0 <= x < len(names) else x for x in t]
            check_tags(t, key=key, row=i)
            out.append(t)
        return Dataset.from_dict({"words": [list(map(str, w)) for w in words], "tags": out})

    def encode_labels(
        self, ds: Dataset, data_cfg: TokenClassificationData, label_space: LabelSpace, *, key: str
    ) -> Dataset:
        ds = self._named_tags(ds, data_cfg, key=key)
        unknown = sorted({t for row in column_values(ds, "tags") for t in row} - set(label_space.labels))
        if unknown:
            raise DataError(
                f"{key}: tags {unknown[:5]} are not among the training tags {list(label_space.labels)[:10]}; "
                "add examples of them to the training data or remove those rows"
            )
        ids = label_space.label2id
        return ds.map(
            lambda b: {"tag_ids": [[ids[t] for t in row] for row in b["tags"]]}, batched=True, desc="tags"
        )

    def prepare(self, cfg: RunConfig, processor: Any) -> PreparedData:
        d = cfg.data
        box: dict[str, LabelSpace] = {}

        def encode(ds: Dataset, key: str) -> Dataset:
            if "space" not in box:  # the first source read is train: its tags are the label space
                named = self._named_tags(ds, d, key=key)
                tags = sorted({t for row in named["tags"] for t in row}, key=lambda t: (t != "O", t[2:], t))
                if len(tags) < 2:
                    raise DataError(f"{key}: found the single tag {tags[0]!r}; tag some entities (B-<type>)")
                box["space"] = LabelSpace(tuple(tags))
            return self.encode_labels(ds, d, box["space"], key=key)

        raw = build_splits(
            d, columns=self.columns(d), encode=encode, reader=lambda loc, key: self.read_data(loc, d, key=key)
        )
        space = box["space"]
        splits = {
            name: self.preprocess(ds, processor, d, space, key=f"data.{name}") for name, ds in raw.items()
        }
        lengths = np.asarray(column_values(splits["train"], "length"))
        stats = {
            "sizes": {k: len(v) for k, v in raw.items()},
            "columns": [d.tokens_column, d.tags_column],
            "label_counts": {k: self._entity_counts(v["tags"]) for k, v in raw.items()},
            "warnings": [],
            "train_tokens": {
                "mean": float(lengths.mean()),
                "max": int(lengths.max()),
                "truncated": int((lengths >= d.max_length).sum()),
            },
        }
        return PreparedData(DatasetDict(splits), processor, space, stats)

    @staticmethod
    def _entity_counts(tags: list[list[str]]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in tags:
            for kind, _, _ in entities_of(row):
                counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items()))

    def preprocess(
        self, ds: Dataset, processor: Any, data_cfg: TokenClassificationData, label_space: Any, *, key: str
    ) -> Dataset:
        d = data_cfg
        inside = {
            i: label_space.label2id.get("I-" + t[2:], i)
            for i, t in enumerate(label_space.labels)
            if t.startswith("B-")
        }

        def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
            enc = processor(
                batch["words"], is_split_into_words=True, truncation=True, max_length=d.max_length
            )
            labels = []
            for i, tag_ids in enumerate(batch["tag_ids"]):
                row, previous = [], None
                for w in enc.word_ids(i):
                    if w is None:
                        row.append(IGNORE)
                    elif w != previous:
                        row.append(tag_ids[w])
                    else:
                        row.append(inside.get(tag_ids[w], tag_ids[w]) if d.label_all_subwords else IGNORE)
                    previous = w
                labels.append(row)
            out = dict(enc)
            out["labels"] = labels
            out["length"] = [len(ids) for ids in enc["input_ids"]]
            out["words"] = batch["words"]  # kept for the report's mistakes; not part of a batch
            return out

        return ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenize {key}")

    def collate(self, processor: Any, data_cfg: TokenClassificationData, *, train: bool = False) -> Any:
        from transformers import DataCollatorForTokenClassification

        pad = DataCollatorForTokenClassification(processor, pad_to_multiple_of=data_cfg.pad_to_multiple_of)

        def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            return pad([{k: v for k, v in ex.items() if k not in ("length", "words")} for ex in examples])

        return collate_fn

    # ---- model ----------------------------------------------------------------------------------
    def load_model(
        self, model_cfg: ModelConfig, model_path: str, label_space: LabelSpace, data_cfg: Any = None
    ) -> tuple[torch.nn.Module, list[str]]:
        from transformers import AutoModelForTokenClassification

        config = load_base_config(
            model_cfg,
            model_path,
            num_labels=label_space.num_labels,
            id2label=label_space.id2label,
            label2id=label_space.label2id,
        )
        try:
            with quiet_transformers():
                model, info = AutoModelForTokenClassification.from_pretrained(
                    model_path,
                    config=config,
                    ignore_mismatched_sizes=True,  # a head of another size is made anew
                    output_loading_info=True,
                    revision=model_cfg.revision,
                    trust_remote_code=model_cfg.trust_remote_code,
                )
        except ValueError as exc:
            if "Unrecognized configuration class" in str(exc):
                raise ModelError(
                    f"model.name_or_path: '{model_path}' has no token-classification variant (its "
                    "architecture does not fit task token-classification); pick a text encoder such as BERT"
                ) from None
            raise ModelError(
                f"model.name_or_path: could not load '{model_path}': {str(exc).splitlines()[0][:200]}"
            ) from None
        return model, new_module_names(info.get("missing_keys", []), info.get("mismatched_keys", []))

    # ---- evaluation -----------------------------------------------------------------------------
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
        """Entity precision / recall / F1 (micro and per type), word accuracy, the loss, and the
        sentences with the most wrong words."""
        from lorakit.data.batching import evaluate_model

        logits, labels, loss = evaluate_model(
            model,
            ds,
            self.collate(processor, cfg.data),
            batch_size=batch_size,
            device=device,
            amp=amp,
            progress=progress,
            per_token=True,
        )
        true, pred = self._word_tags(logits, labels, label_space)
        metrics = {"loss": loss, **self.entity_metrics(true, pred)}
        metrics["mistakes"] = self._mistakes(ds, true, pred)
        return metrics

    def compute_metrics(self, logits: np.ndarray, labels: np.ndarray, label_space: Any) -> dict[str, Any]:
        true, pred = self._word_tags(list(logits), list(labels), label_space)
        return self.entity_metrics(true, pred)

    @staticmethod
    def _word_tags(
        logits: list[np.ndarray], labels: list[np.ndarray], space: LabelSpace
    ) -> tuple[list[list[str]], list[list[str]]]:
        """True and predicted tags of the scored tokens (each word's first sub-word) of every example."""
        true, pred = [], []
        for z, y in zip(logits, labels, strict=True):
            keep = y != IGNORE
            true.append([space.labels[i] for i in y[keep]])
            pred.append([space.labels[i] for i in z[keep].argmax(-1)])
        return true, pred

    @staticmethod
    def entity_metrics(true: list[list[str]], pred: list[list[str]]) -> dict[str, Any]:
        """seqeval's entity-level scores (exact matches of type and words), and the word accuracy."""
        from seqeval.metrics import classification_report

        report = classification_report(true, pred, output_dict=True, zero_division=0)
        per_type = {
            k: {
                "precision": float(v["precision"]),
                "recall": float(v["recall"]),
                "f1": float(v["f1-score"]),
                "support": int(v["support"]),
            }
            for k, v in report.items()
            if not k.endswith(" avg")
        }
        micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
        words = sum(len(t) for t in true)
        right = sum(a == b for t, p in zip(true, pred, strict=True) for a, b in zip(t, p, strict=True))
        return {
            "entity_f1": float(micro["f1-score"]),
            "entity_precision": float(micro["precision"]),
            "entity_recall": float(micro["recall"]),
            "word_accuracy": right / words if words else 0.0,
            "per_type": per_type,
        }

    #: How many of the worst-tagged evaluation sentences the report shows.
    mistakes_kept: ClassVar[int] = 12

    def _mistakes(self, ds: Dataset, true: list[list[str]], pred: list[list[str]]) -> list[dict[str, Any]]:
        """The sentences with the most wrongly tagged words, worst first: the words as written, and the
        true and predicted entities."""
        wrong = sorted(
            (i for i in range(len(true)) if true[i] != pred[i]),
            key=lambda i: -sum(a != b for a, b in zip(true[i], pred[i], strict=True)),
        )[: self.mistakes_kept]
        out = []
        for i in wrong:
            words = ds[i]["words"]
            out.append(
                {
                    "row": i,
                    "input": " ".join(words)[:400],
                    "true": _show(true[i], words),
                    "predicted": _show(pred[i], words),
                }
            )
        return out

    def report_sections(self, split: str, metrics: dict[str, Any], label_space: Any) -> list[ReportSection]:
        out: list[ReportSection] = []
        if metrics.get("per_type"):
            rows = [
                [k, v["precision"], v["recall"], v["f1"], v["support"]]
                for k, v in metrics["per_type"].items()
            ]
            out.append(
                ReportTable(
                    f"Entities per type: {split}",
                    ["type", "precision", "recall", "F1", "support"],
                    rows,
                    "per-class",
                )
            )
        if metrics.get("mistakes"):
            rows = [[m["input"], m["true"], m["predicted"]] for m in metrics["mistakes"]]
            out.append(
                ReportTable(
                    f"Sentences with the most wrong tags: {split}",
                    ["sentence", "true entities", "predicted"],
                    rows,
                    "samples",
                )
            )
        return out

    # ---- prediction and serving -----------------------------------------------------------------
    def _encode_texts(
        self, processor: Any, data_cfg: TokenClassificationData, texts: list[Any]
    ) -> tuple[list[list[tuple[str, int, int]]], Any]:
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"inputs[{i}]: expected a non-empty text")
        words = [split_words(t) for t in texts]
        enc = processor(
            [[w for w, _, _ in ws] for ws in words],
            is_split_into_words=True,
            truncation=True,
            max_length=data_cfg.max_length,
        )
        return words, enc

    def serving_rows(
        self, processor: Any, data_cfg: TokenClassificationData, inputs: list[Any]
    ) -> list[dict[str, torch.Tensor]]:
        _, enc = self._encode_texts(processor, data_cfg, inputs)
        return [
            {
                "input_ids": torch.tensor(enc["input_ids"][i]),
                "attention_mask": torch.tensor(enc["attention_mask"][i]),
                "word_ids": torch.tensor([-1 if w is None else w for w in enc.word_ids(i)]),
            }
            for i in range(len(inputs))
        ]

    def serve_batch(
        self, model: torch.nn.Module, processor: Any, rows: list[Any], options: Any, **adapter_kwargs: Any
    ) -> list[Any]:
        """Per-token logits of each row (cut to its own length), for rows :meth:`serving_rows` made."""
        from lorakit.tasks.classification import pad_rows

        device = next(model.parameters()).device
        batch = pad_rows(
            [{k: v for k, v in r.items() if k != "word_ids"} for r in rows], processor.pad_token_id or 0
        )
        logits = model(**{k: v.to(device) for k, v in batch.items()}, **adapter_kwargs).logits.float().cpu()
        return [z[: len(r["input_ids"])] for z, r in zip(logits, rows, strict=True)]

    def serving_records(
        self, inputs: list[Any], rows: list[Any], outputs: list[Any], label_space: Any, *, top_k: int
    ) -> list[dict[str, Any]]:
        return [
            {"entities": self._entities(text, split_words(text), row["word_ids"].tolist(), z, label_space)}
            for text, row, z in zip(inputs, rows, outputs, strict=True)
        ]

    @staticmethod
    def _entities(
        text: str,
        words: list[tuple[str, int, int]],
        word_ids: list[int],
        logits: torch.Tensor,
        space: LabelSpace,
    ) -> list[dict[str, Any]]:
        """The entities of ``text`` from per-token logits: each word's first sub-word decides its tag."""
        probs = torch.softmax(logits.float(), dim=-1)
        first = {}
        for pos, w in enumerate(word_ids):
            if w is not None and w >= 0 and w not in first:
                first[w] = pos
        seen = sorted(first)
        tags = [space.labels[int(probs[first[w]].argmax())] for w in seen]
        scores = [float(probs[first[w]].max()) for w in seen]
        out = []
        for kind, a, b in entities_of(tags):
            start, end = words[seen[a]][1], words[seen[b - 1]][2]
            out.append(
                {
                    "label": kind,
                    "text": text[start:end],
                    "start": start,
                    "end": end,
                    "score": float(np.mean(scores[a:b])),
                }
            )
        return out

    @torch.no_grad()
    def predict(
        self,
        model: torch.nn.Module,
        processor: Any,
        inputs: list[Any],
        label_space: LabelSpace,
        data_cfg: TokenClassificationData,
        *,
        top_k: int = 1,
        batch_size: int = 32,
    ) -> list[dict[str, Any]]:
        """The entities of each input text, with their character spans and scores."""
        results: list[dict[str, Any]] = []
        for start in range(0, len(inputs), batch_size):
            chunk = [str(t) for t in inputs[start : start + batch_size]]
            rows = self.serving_rows(processor, data_cfg, chunk)
            outputs = self.serve_batch(model, processor, rows, None)
            for text, record in zip(
                chunk, self.serving_records(chunk, rows, outputs, label_space, top_k=top_k), strict=True
            ):
                results.append({"input": text} | record)
        return results

    def predict_line(self, record: dict[str, Any]) -> str:
        found = (
            "  ".join(f"{e['label']} {e['text']!r} {e['score']:.3f}" for e in record["entities"])
            or "(no entities)"
        )
        text = record["input"] if len(record["input"]) <= 60 else record["input"][:57] + "..."
        return f"{found}\t{text}"

    # ---- export ---------------------------------------------------------------------------------
    def export_batches(
        self, processor: Any, data_cfg: TokenClassificationData
    ) -> list[dict[str, torch.Tensor]]:
        texts = [
            "Ada Lovelace was born in London in 1815.",
            "Hi.",
            "The Analytical Engine was designed by Charles Babbage.",
        ]

        def batch(rows: slice) -> dict[str, torch.Tensor]:
            return dict(
                processor(
                    texts[rows],
                    padding=True,
                    truncation=True,
                    max_length=data_cfg.max_length,
                    return_tensors="pt",
                )
            )

        return [batch(slice(0, 3)), batch(slice(1, 2)), batch(slice(1, 3))]

    def load_merged(self, folder: Path, loaded: Any) -> torch.nn.Module:
        from transformers import AutoModelForTokenClassification

        with quiet_transformers():
            return AutoModelForTokenClassification.from_pretrained(str(folder)).eval()

    def usage(self, meta: dict[str, Any]) -> list[str]:
        where = meta["base_model"].get("resolved") or meta["base_model"]["name_or_path"]
        n = len((meta.get("label_space") or {}).get("id2label", {})) or 2
        return [
            "from peft import PeftModel",
            "from transformers import AutoModelForTokenClassification, AutoTokenizer",
            "",
            f"base = AutoModelForTokenClassification.from_pretrained({where!r}, num_labels={n})",
            'model = PeftModel.from_pretrained(base, "ADAPTER_DIR").eval()',
            f"tokenizer = AutoTokenizer.from_pretrained({where!r})",
        ]


def _show(tags: list[str], words: list[str]) -> str:
    """A tag sequence's entities as ``TYPE: words``, or ``-`` where there are none."""
    return "; ".join(f"{k}: {' '.join(words[a:b])}" for k, a, b in entities_of(tags)) or "-"
