"""Causal language models: instruction tuning (chat / alpaca rows) and continued pre-training (text).

Every row becomes a conversation rendered with the tokenizer's chat template (or a named one). The
loss is taken on the assistant's answers only: answer spans are found as character ranges of the
rendered text (the text before each answer is the template applied to the earlier messages with a
generation prompt) and mapped to tokens with the tokenizer's offsets, so the mask is exact for any
template. The end-of-turn token closing each answer is part of it: the model learns to stop.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from pydantic import Field, field_validator, model_validator

from lorakit.config.schema import ModelConfig, RunConfig, TokenizedDataConfig, TrainConfig
from lorakit.data.batching import column_values, eval_batches
from lorakit.data.sources import build_splits
from lorakit.data.templates import chat_template_problem, format_template_problem, template_validator
from lorakit.errors import DataError, ModelError
from lorakit.files.paths import cache_root
from lorakit.models.gguf_reading import gguf_read_once
from lorakit.models.modeling import new_module_names, quiet_transformers
from lorakit.runtime import distributed
from lorakit.tasks.base import GenerateOptions, PreparedData, ReportSection, ReportTable, Task

log = logging.getLogger("lorakit")
IGNORE = -100

NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Works with any tokenizer: answers end with its EOS token.
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


class CausalLMData(TokenizedDataConfig):
    """Conversations, instructions or plain text for a causal language model."""

    prompt_format: Literal["auto", "chat", "alpaca", "text"] = Field(
        "auto",
        description="Row format: `chat` (a messages list), `alpaca` (instruction / input / output "
        "columns, or `instruction_template` + `output_column`), `text` (plain text, continued "
        "pre-training); `auto` decides by the columns present.",
    )
    messages_column: str = Field("messages", description="chat: column with the list of messages.")
    message_keys: dict[str, str] = Field(
        default_factory=lambda: {"role": "role", "content": "content"},
        description="chat: the keys of a message's role and text, "
        "e.g. {role: from, content: value} for ShareGPT.",
    )
    role_names: dict[str, str] = Field(
        default_factory=lambda: {
            "human": "user",
            "gpt": "assistant",
            "bot": "assistant",
            "model": "assistant",
        },
        description="chat: role values mapped to system / user / assistant.",
    )
    instruction_column: str = Field("instruction", description="alpaca: column with the instruction.")
    input_column: str = Field(
        "input", description="alpaca: optional column with the input the instruction refers to."
    )
    output_column: str = Field(
        "output", description="alpaca: column with the answer (integer answers are named by `label_names`)."
    )
    instruction_template: str | None = Field(
        None,
        description="alpaca: build the user message from columns, e.g. 'Review: {text}\nIs it positive "
        "or negative?' (turns any labelled table into instructions).",
    )
    text_column: str = Field("text", description="text: column with the text to continue.")
    system_prompt: str | None = Field(
        None, description="A system message put before every conversation that has none."
    )
    chat_template: str | None = Field(
        None,
        description="A named template (chatml, alpaca) or a Jinja template, for tokenizers "
        "without one (or to replace theirs).",
    )
    packing: bool = Field(
        False,
        description="Pack several short examples into each max_length row; examples never attend to "
        "each other (block-diagonal attention, positions restart).",
    )

    # Checked at load (`lorakit check`, the UI's form), before a tokenizer or a row is read.
    _chat_template = field_validator("chat_template")(
        template_validator(chat_template_problem, skip=tuple(NAMED_TEMPLATES))
    )
    _instruction_template = field_validator("instruction_template")(
        template_validator(format_template_problem)
    )


class CausalLMTrain(TrainConfig):
    """Optimisation and evaluation schedule, with the generated answers scored at each evaluation."""

    generation_samples: int = Field(
        64,
        ge=0,
        description="Validation / test examples answered by greedy generation at each evaluation, "
        "for exact match and the report's samples; 0 = loss only.",
    )
    max_new_tokens: int = Field(32, ge=1, description="Longest generated answer in evaluations.")
    gradient_checkpointing: bool | float = Field(
        0.25,
        description=TrainConfig.model_fields["gradient_checkpointing"].description
        + " Causal LMs: a quarter of the blocks by default, a middle ground between memory and step "
        "time; false is faster when memory allows.",
    )

    @model_validator(mode="after")
    def _exact_match_needs_answers(self) -> CausalLMTrain:
        # Caught at load, not after the first epoch: exact match is only computed from generated answers.
        if self.metric_for_best == "exact_match" and self.generation_samples == 0:
            raise ValueError(
                "train.metric_for_best = 'exact_match' needs train.generation_samples > 0 (answers are "
                "generated to score it); raise generation_samples or select on loss"
            )
        return self


# ---- model location (folders, Hub ids, GGUF files) ------------------------------------------------


def gguf_parts(model_cfg: ModelConfig, model_path: str) -> tuple[str, str | None]:
    """(folder or Hub id, GGUF file name or None) for transformers' ``from_pretrained``."""
    p = Path(model_path)
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if model_cfg.gguf_file:
        return model_path, model_cfg.gguf_file
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(f.name for f in p.glob("*.gguf"))
        if len(found) == 1:
            return model_path, found[0]
        if found:
            raise ModelError(
                f"model.gguf_file: folder '{model_path}' holds several GGUF files "
                f"({', '.join(found)}); name one"
            )
    return model_path, None


def plain_weights(model: Any) -> None:
    """GGUF weights arrive dequantised: forget the loader's quantizer flag so that peft and saving
    treat them as plain weights."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        model.config.quantization_config = None


def gguf_converted(where: str, gguf: str | None) -> tuple[str, str | None]:
    """A local GGUF file as a transformers folder (safetensors weights, config, tokenizer), converted once.

    transformers parses the GGUF file for the config, the tokenizer and the weights separately (read
    once here: :func:`.gguf_reading.gguf_read_once`), which still costs a process's start seconds; the
    converted folder, kept in
    :func:`cache_root` under ``gguf/`` and keyed by the file's path, size, modification time and the
    transformers version, loads in seconds. The same weights and tokenizer either way. Hub GGUF files
    and ``LORAKIT_GGUF_CACHE=0`` load directly; if the cache cannot be written, the file is read as is.
    """
    src = Path(where) / gguf if gguf else None
    if src is None or not src.is_file() or os.environ.get("LORAKIT_GGUF_CACHE") == "0":
        return where, gguf
    import hashlib
    import shutil

    import transformers

    stat = src.stat()
    key = hashlib.sha256(
        f"{src.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode()
    ).hexdigest()[:16]
    folder = cache_root() / "gguf" / f"{src.stem}-{key}"
    if (folder / "config.json").is_file():
        return str(folder), None
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.partial"
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to a transformers folder once (later loads read %s)", src, folder)
        with quiet_transformers(), gguf_read_once():  # one parse of the file, not three
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
            model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf)
        plain_weights(model)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(folder)  # atomic: a folder with config.json is complete
        except OSError:
            if not (folder / "config.json").is_file():  # not another process's finished copy
                raise
    except (
        Exception
    ) as exc:  # a read-only cache, a full disk, a file transformers cannot read: load it directly
        log.info("could not cache the converted GGUF model (%s); reading %s directly", exc, src)
        return where, gguf
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder), None


def end_of_turn_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Token ids that end an answer: EOS, the template's end-of-turn token, the model's own EOS list."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    return sorted(i for i in ids if i is not None)


# ---- rows -> conversations ----------------------------------------------------------------------


def detect_format(data_cfg: CausalLMData, columns: list[str]) -> str:
    if data_cfg.prompt_format != "auto":
        return data_cfg.prompt_format
    if data_cfg.messages_column in columns:
        return "chat"
    if data_cfg.instruction_template or data_cfg.instruction_column in columns:
        return "alpaca"
    if data_cfg.text_column in columns:
        return "text"
    raise DataError(
        f"data: cannot tell the row format from the columns {', '.join(columns)}; expected "
        f"'{data_cfg.messages_column}' (chat), '{data_cfg.instruction_column}' + '{data_cfg.output_column}' "
        f"(alpaca) or '{data_cfg.text_column}' (text), or set data.prompt_format"
    )


def required_columns(data_cfg: CausalLMData, fmt: str) -> list[str]:
    if fmt == "chat":
        return [data_cfg.messages_column]
    if fmt == "alpaca":
        if data_cfg.instruction_template:
            import string

            fields = [f for _, f, _, _ in string.Formatter().parse(data_cfg.instruction_template) if f]
            return [*sorted(set(fields)), data_cfg.output_column]
        return [data_cfg.instruction_column, data_cfg.output_column]
    return [data_cfg.text_column]


def to_messages(
    row: dict[str, Any], data_cfg: CausalLMData, fmt: str, *, key: str, index: int
) -> list[dict[str, str]]:
    """One row as a list of {role, content} messages (system / user / assistant)."""
    d = data_cfg
    if fmt == "chat":
        raw = row[d.messages_column]
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{key}: row {index}: '{d.messages_column}' is not a non-empty list of messages")
        rk, ck = d.message_keys.get("role", "role"), d.message_keys.get("content", "content")
        messages = []
        for m in raw:
            if not isinstance(m, dict) or rk not in m or ck not in m:
                raise DataError(
                    f"{key}: row {index}: a message lacks '{rk}' / '{ck}' (keys found: "
                    f"{sorted(m) if isinstance(m, dict) else type(m).__name__}); set data.message_keys"
                )
            role = d.role_names.get(str(m[rk]), str(m[rk]))
            if role not in ("system", "user", "assistant"):
                raise DataError(
                    f"{key}: row {index}: role '{m[rk]}' is not system / user / assistant; map "
                    "it with data.role_names"
                )
            messages.append({"role": role, "content": str(m[ck] if m[ck] is not None else "")})
    elif fmt == "alpaca":
        if d.instruction_template:
            try:
                user = d.instruction_template.format(**row)
            except (KeyError, IndexError, ValueError) as exc:
                raise DataError(
                    f"data.instruction_template: cannot fill it from row {index} of {key}: {exc}"
                ) from None
        else:
            user = str(row[d.instruction_column] or "")
            extra = row.get(d.input_column)
            if extra:
                user += "\n\n" + str(extra)
        answer = row[d.output_column]
        if (
            isinstance(answer, int)
            and not isinstance(answer, bool)
            and d.label_names
            and 0 <= answer < len(d.label_names)
        ):
            answer = d.label_names[answer]
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": "" if answer is None else str(answer)},
        ]
    else:
        return [{"role": "text", "content": str(row[d.text_column] or "")}]
    if d.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": d.system_prompt})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(
            f"{key}: row {index} has no assistant answer to learn; remove it or fill in "
            f"'{d.output_column if fmt == 'alpaca' else 'the assistant message'}'"
        )
    return messages


def render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_example(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict[str, Any]:
    """Token ids, labels (answers only; everything for plain text), the prompt of the last answer and
    its reference, and how truncation treated the example (``cut``: 0 whole, 1 prompt cut, 2 answer
    cut, 3 answer lost)."""
    if messages[0]["role"] == "text":
        ids = tokenizer(messages[0]["content"], add_special_tokens=True, verbose=False)[
            "input_ids"
        ]  # cut below, on purpose
        if tokenizer.eos_token_id is not None:
            ids = [*ids, tokenizer.eos_token_id]
        cut = 2 if len(ids) > max_length else 0
        ids = ids[:max_length]
        return {"input_ids": ids, "labels": list(ids), "prompt_ids": [], "reference": "", "cut": cut}
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        start, end = len(before), len(render(tokenizer, messages[: i + 1]))
        if text[:start] != before:
            raise DataError(
                "data.chat_template: the template renders earlier turns differently once later ones "
                "follow; answer spans cannot be located (use chat_template: chatml)"
            )
        spans.append((start, end))
    enc = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
    )  # cut below, on purpose
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [
        tid if any(s <= a < e for s, e in spans) and b > a else IGNORE
        for tid, (a, b) in zip(ids, offsets, strict=True)
    ]
    last_start = spans[-1][0]
    n_prompt = next((j for j, (a, b) in enumerate(offsets) if a >= last_start and b > a), len(ids))
    prompt_ids = ids[:n_prompt]
    reference = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
    cut = 0
    if len(ids) > max_length:
        if len(ids) - n_prompt + 1 <= max_length:
            ids, labels, cut = ids[-max_length:], labels[-max_length:], 1  # drop the start of the prompt
        else:
            ids, labels = ids[:max_length], labels[:max_length]
            cut = 3 if all(x == IGNORE for x in labels) else 2
    return {
        "input_ids": ids,
        "labels": labels,
        "prompt_ids": prompt_ids if len(prompt_ids) < max_length else prompt_ids[-(max_length - 1) :],
        "reference": reference,
        "cut": cut,
    }


def pack(rows: list[dict[str, Any]], max_length: int) -> dict[str, list[Any]]:
    """Greedy packing of examples into rows of at most ``max_length`` tokens; ``seq_lens`` keeps the
    boundaries so that attention stays inside each example."""
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "seq_lens": [], "length": []}
    ids: list[int] = []
    labels: list[int] = []
    lens: list[int] = []
    for r in rows:
        if ids and len(ids) + len(r["input_ids"]) > max_length:
            (
                out["input_ids"].append(ids),
                out["labels"].append(labels),
                out["seq_lens"].append(lens),
                out["length"].append(len(ids)),
            )
            ids, labels, lens = [], [], []
        ids = ids + r["input_ids"]
        labels = labels + r["labels"]
        lens.append(len(r["input_ids"]))
    if ids:
        (
            out["input_ids"].append(ids),
            out["labels"].append(labels),
            out["seq_lens"].append(lens),
            out["length"].append(len(ids)),
        )
    return out


def block_causal_mask(seq_lens: list[list[int]], width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask [B, 1, T, T]:
    causal inside each packed example, nothing across examples or onto padding."""
    allowed = torch.zeros(len(seq_lens), 1, width, width, dtype=torch.bool)
    for b, lens in enumerate(seq_lens):
        start = 0
        for n in lens:
            allowed[b, 0, start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
            start += n
        for pad in range(start, width):  # padding rows see themselves only (their outputs are ignored)
            allowed[b, 0, pad, pad] = True
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def logits_keep_mode(model: torch.nn.Module) -> str:
    """How ``model``'s forward can limit its vocabulary projection to the positions a loss needs:
    "mask" (transformers' ``slice_logits_to_keep``: a 2-D boolean mask, any positions per row),
    "window" (``logits_to_keep`` as 1-D positions, shared by every row) or "none"."""
    import inspect
    import sys

    while not hasattr(model, "config") and hasattr(model, "module"):  # DDP / compile wrappers
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return "none"
    return "mask" if hasattr(sys.modules[type(model).__module__], "slice_logits_to_keep") else "window"


def answer_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [N, V], target tokens [N], row of each [N]) at the N positions that predict a labelled
    token, in row-major order. The head runs on those positions only (``logits_to_keep``), not on the
    prompts: on SmolLM2 the vocabulary projection is a fifth of a forward pass and the full logits the
    largest tensor of a step. ``model`` is called as a whole, so DDP / FSDP wrappers see the call."""
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    mask = targets != IGNORE
    inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": False}
    mode = logits_keep_mode(model)
    if mode == "mask":
        logits = model(**inputs, logits_to_keep=torch.nn.functional.pad(mask, (0, 1))).logits
    elif mode == "window":
        cols = mask.any(0).nonzero().squeeze(-1)
        lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1)
        keep = torch.arange(lo, hi, device=mask.device)
        logits = model(**inputs, logits_to_keep=keep).logits[mask[:, lo:hi]]
    else:
        logits = model(**inputs).logits[:, :-1][mask]
    return logits, targets[mask], mask.nonzero()[:, 0]


def answer_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed negative log-likelihood of the labelled tokens, their count)."""
    logits, targets, _ = answer_logits(model, batch)
    nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return nll, torch.tensor(len(targets))


def normalise_answer(s: str) -> str:
    return " ".join(s.strip().casefold().split()).rstrip(".!")


def exact_match(refs: list[str], outs: list[str]) -> float | None:
    """Share of answers equal to their reference after :func:`normalise_answer`, over the rows that
    have a reference; None when none has."""
    scored = [(r, o) for r, o in zip(refs, outs, strict=True) if r]
    if not scored:
        return None
    return float(np.mean([normalise_answer(r) == normalise_answer(o) for r, o in scored]))


class CausalLM(Task):
    name = "causal-lm"
    data_config = CausalLMData
    train_config = CausalLMTrain
    peft_task_type = "CAUSAL_LM"
    default_metric = "loss"
    example_input = '"Write a haiku about autumn."'
    cli_command = "generate"
    try_widget = "chat"
    curve_metrics = ("perplexity", "exact_match")
    lower_is_better = ("perplexity",)
    auto_classes = ("AutoModelForCausalLM", "AutoTokenizer")

    # ---- data -----------------------------------------------------------------------------------
    def load_processor(self, model_cfg: ModelConfig, model_path: str) -> Any:
        from transformers import AutoTokenizer

        from lorakit.models.modeling import reject_zoo

        reject_zoo(model_path)
        where, gguf = gguf_converted(*gguf_parts(model_cfg, model_path))
        try:
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(
                    where,
                    gguf_file=gguf,
                    revision=model_cfg.revision,
                    trust_remote_code=model_cfg.trust_remote_code,
                )
        except Exception as exc:
            raise ModelError(
                f"model.name_or_path: could not load a tokenizer from '{model_path}': "
                f"{str(exc).splitlines()[0][:200]}"
            ) from None
        if not getattr(tok, "is_fast", False):
            raise ModelError(
                f"model.name_or_path: the tokenizer of '{model_path}' is not a fast tokenizer; "
                "lorakit needs token offsets to mask prompts"
            )
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        return tok

    def _with_template(self, tokenizer: Any, data_cfg: CausalLMData) -> Any:
        name = data_cfg.chat_template
        if name:
            template = NAMED_TEMPLATES.get(name, name)
            if name == "chatml" and tokenizer.convert_tokens_to_ids("<|im_end|>") in (
                None,
                tokenizer.unk_token_id,
            ):
                raise ModelError(
                    "data.chat_template: chatml needs the tokens <|im_start|> / <|im_end|>, which "
                    "this tokenizer lacks; use chat_template: alpaca"
                )
            tokenizer.chat_template = template
        elif not getattr(tokenizer, "chat_template", None):
            raise ModelError(
                "model.name_or_path: the tokenizer has no chat template; set data.chat_template "
                "(chatml or alpaca)"
            )
        return tokenizer

    def columns(self, data_cfg: CausalLMData) -> list[str]:
        # With `auto` the format (and so the columns) is decided from the data itself.
        return required_columns(data_cfg, data_cfg.prompt_format) if data_cfg.prompt_format != "auto" else []

    def prepare(self, cfg: RunConfig, processor: Any) -> PreparedData:
        d = cfg.data
        fmt_box: dict[str, str] = {}

        def encode(ds: Dataset, key: str) -> Dataset:
            fmt = fmt_box.setdefault("fmt", detect_format(d, ds.column_names))
            from lorakit.data.sources import require_columns

            require_columns(ds, required_columns(d, fmt), key=key, data_cfg=d)
            return ds

        raw = build_splits(d, columns=self.columns(d), encode=encode)
        splits, cut_counts = {}, {}
        for name, ds in raw.items():
            splits[name], cut_counts[name] = self._encode_split(ds, processor, d, key=f"data.{name}")
        stats: dict[str, Any] = {
            "sizes": {k: len(v) for k, v in raw.items()},
            "columns": raw["train"].column_names,
            "format": fmt_box["fmt"],
        }
        stats["truncation"] = cut_counts
        warnings = []
        for split, c in cut_counts.items():
            if c["prompt_cut"] or c["answer_cut"] or c["dropped"]:
                warnings.append(
                    f"data.{split}: {c['prompt_cut']} example(s) lost the start of their prompt, "
                    f"{c['answer_cut']} the end of their answer, {c['dropped']} dropped (answer "
                    f"beyond data.max_length={d.max_length})"
                )
        stats["warnings"] = warnings
        lengths = np.asarray(column_values(splits["train"], "length"))
        stats["train_tokens"] = {
            "mean": float(lengths.mean()),
            "max": int(lengths.max()),
            "truncated": int(cut_counts["train"]["prompt_cut"] + cut_counts["train"]["answer_cut"]),
        }
        return PreparedData(DatasetDict(splits), processor, None, stats)

    def preprocess(
        self, ds: Dataset, processor: Any, data_cfg: CausalLMData, label_space: Any, *, key: str
    ) -> Dataset:
        return self._encode_split(ds, processor, data_cfg, key=key)[0]

    def _encode_split(
        self, ds: Dataset, processor: Any, data_cfg: CausalLMData, *, key: str
    ) -> tuple[Dataset, dict[str, int]]:
        """Model-ready rows of one split and how truncation treated its examples."""
        fmt = detect_format(data_cfg, ds.column_names)
        if fmt != "text":
            self._with_template(processor, data_cfg)
        rows = []
        cuts = {"prompt_cut": 0, "answer_cut": 0, "dropped": 0}
        for i, row in enumerate(ds):
            ex = encode_example(
                processor, to_messages(row, data_cfg, fmt, key=key, index=i), data_cfg.max_length
            )
            if ex["cut"] == 3:
                cuts["dropped"] += 1
                continue
            cuts["prompt_cut"] += ex["cut"] == 1
            cuts["answer_cut"] += ex["cut"] == 2
            rows.append(ex)
        if not rows:
            raise DataError(
                f"{key}: every example lost its answer to truncation; raise data.max_length "
                f"(now {data_cfg.max_length})"
            )
        if data_cfg.packing and key == "data.train":
            return Dataset.from_dict(pack(rows, data_cfg.max_length)), cuts
        return Dataset.from_dict(
            {
                "input_ids": [r["input_ids"] for r in rows],
                "labels": [r["labels"] for r in rows],
                "length": [len(r["input_ids"]) for r in rows],
                "prompt_ids": [r["prompt_ids"] for r in rows],
                "reference": [r["reference"] for r in rows],
            }
        ), cuts

    def collate(self, processor: Any, data_cfg: CausalLMData, *, train: bool = False) -> Any:
        pad_id = processor.pad_token_id if processor.pad_token_id is not None else 0
        multiple = data_cfg.pad_to_multiple_of or 1

        def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            width = (
                -(-max(len(ex["input_ids"]) for ex in examples) // multiple) * multiple
            )  # the longest, rounded up
            ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
            labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
            attn = torch.zeros((len(examples), width), dtype=torch.long)
            for i, ex in enumerate(examples):
                n = len(ex["input_ids"])
                ids[i, :n] = torch.tensor(ex["input_ids"])
                labels[i, :n] = torch.tensor(ex["labels"])
                attn[i, :n] = 1
            batch = {"input_ids": ids, "labels": labels}
            if "seq_lens" in examples[0]:
                # Packed rows: positions restart per example and attention stays inside it.
                pos = torch.zeros((len(examples), width), dtype=torch.long)
                for i, ex in enumerate(examples):
                    start = 0
                    for n in ex["seq_lens"]:
                        pos[i, start : start + n] = torch.arange(n)
                        start += n
                batch["position_ids"] = pos
                batch["attention_mask"] = block_causal_mask(
                    [ex["seq_lens"] for ex in examples], width, torch.float32
                )
            else:
                batch["attention_mask"] = attn
            return batch

        return collate_fn

    # ---- model ----------------------------------------------------------------------------------
    def load_model(
        self, model_cfg: ModelConfig, model_path: str, label_space: Any, data_cfg: CausalLMData | None = None
    ) -> tuple[torch.nn.Module, list[str]]:
        from transformers import AutoModelForCausalLM

        from lorakit.models.modeling import reject_zoo

        reject_zoo(model_path)
        where, gguf = gguf_converted(*gguf_parts(model_cfg, model_path))
        kwargs: dict[str, Any] = {
            "revision": model_cfg.revision,
            "trust_remote_code": model_cfg.trust_remote_code,
        }
        if gguf:
            kwargs["gguf_file"] = gguf
        if model_cfg.quantization != "none":
            if not torch.cuda.is_available():
                raise ModelError(
                    f"model.quantization: {model_cfg.quantization} (QLoRA) needs a CUDA GPU, and "
                    "none is visible; set model.quantization: none"
                )
            try:
                import bitsandbytes  # noqa: F401
                from transformers import BitsAndBytesConfig
            except ImportError:
                raise ModelError(
                    "model.quantization: needs the bitsandbytes package; pip install bitsandbytes"
                ) from None
            four = model_cfg.quantization == "4bit"
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=four,
                load_in_8bit=not four,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        if model_cfg.dropout is not None:
            from lorakit.models.modeling import load_base_config

            kwargs["config"] = load_base_config(model_cfg, where, **({"gguf_file": gguf} if gguf else {}))
        try:
            with quiet_transformers():
                model, info = AutoModelForCausalLM.from_pretrained(where, output_loading_info=True, **kwargs)
        except ValueError as exc:
            if "Unrecognized configuration class" in str(exc):
                raise ModelError(
                    f"model.name_or_path: '{model_path}' is not a causal language model (task causal-lm); "
                    "pick a decoder such as Llama, Qwen2 or SmolLM2"
                ) from None
            raise ModelError(
                f"model.name_or_path: could not load '{model_path}': {str(exc).splitlines()[0][:200]}"
            ) from None
        if getattr(model, "hf_quantizer", None) is not None and model_cfg.quantization == "none":
            plain_weights(model)
        if model_cfg.quantization != "none":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model)
        return model, new_module_names(
            [k for k in info.get("missing_keys", []) if "lm_head" not in k], info.get("mismatched_keys", [])
        )

    # ---- evaluation / generation ----------------------------------------------------------------
    def compute_metrics(self, logits: np.ndarray, labels: np.ndarray, label_space: Any) -> dict[str, Any]:
        return {}

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Mean loss per answer token, with the vocabulary projection on the answer positions only."""
        nll, tokens = answer_nll(model, batch)
        return nll / tokens.clamp(min=1)

    def loss_units(self, batch: dict[str, Any]) -> int:
        # Position t predicts token t + 1: the first position is never a target.
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    @torch.no_grad()
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
        """Token-level loss and perplexity on ``ds``; exact match and samples from greedy answers."""
        was_training = model.training
        model.eval()
        loss, tokens = self._token_loss(
            model, ds, processor, cfg.data, batch_size=batch_size, device=device, amp=amp, progress=progress
        )
        metrics: dict[str, Any] = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "tokens": tokens,
            "examples": len(ds),
        }
        n = min(cfg.train.generation_samples, len(ds)) if "reference" in ds.column_names else 0
        if n:
            from lorakit.data.batching import autocast

            with autocast(device, amp):  # the answers in the run's precision, as the loss
                metrics |= self._answer_metrics(
                    model,
                    ds.select(range(n)),
                    processor,
                    max_new_tokens=cfg.train.max_new_tokens,
                    batch_size=batch_size,
                )
        model.train(was_training)
        return metrics

    def _token_loss(
        self,
        model: torch.nn.Module,
        ds: Dataset,
        processor: Any,
        data_cfg: CausalLMData,
        *,
        batch_size: int,
        device: torch.device,
        amp: torch.dtype | None,
        progress: Any,
    ) -> tuple[float, int]:
        """(mean loss per answer token, answer tokens) over ``ds``, shared out over data-parallel ranks."""
        from lorakit.data.batching import autocast, take, to_device

        collate = self.collate(processor, data_cfg)
        world = distributed.current()
        nll, tokens = 0.0, 0
        batches = eval_batches(column_values(ds, "length"), batch_size)
        for idx in distributed.shard(batches, world):  # each rank its share
            batch = to_device(collate(take(ds, idx)), device)
            with autocast(device, amp):
                batch_nll, batch_tokens = answer_nll(model, batch)
            nll, tokens = nll + float(batch_nll), tokens + int(batch_tokens)
            if progress is not None:
                progress.update(len(idx) * world.size)
        if progress is not None:
            progress.close()
        for _ in range(
            distributed.padding(len(batches), world)
        ):  # FSDP: as many forward passes as the other ranks
            batch = to_device(collate(take(ds, batches[0])), device)
            batch.pop("labels")
            with autocast(device, amp):
                model(**batch)
        nll, tokens = distributed.all_sum([nll, tokens], device)
        return nll / max(1, int(tokens)), int(tokens)

    def _answer_metrics(
        self, model: torch.nn.Module, rows: Dataset, processor: Any, *, max_new_tokens: int, batch_size: int
    ) -> dict[str, Any]:
        """Exact match of greedy answers against the references, and a few samples for the report."""
        world = distributed.current()
        refs, prompts = rows["reference"], rows["prompt_ids"]
        # Each rank answers every world.size-th prompt; the answers are put back in order.
        mine = distributed.shard(prompts, world)
        extra = distributed.padding(
            len(prompts), world
        )  # FSDP: every rank generates for as many prompts, in step
        mine = self.generate_ids(
            model,
            processor,
            mine + [prompts[0]] * extra,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            synced=world.sharded,
        )
        mine = mine[: len(mine) - extra]
        outs: list[str] = [""] * len(prompts)
        for rank, answers in enumerate(distributed.gather(mine, world)):
            outs[rank :: world.size] = answers
        metrics: dict[str, Any] = {}
        em = exact_match(refs, outs)
        if em is not None:
            metrics["exact_match"] = em
            # each answer's exact match, in split order (with its reference): what `lorakit compare` pairs
            metrics["predictions"] = {
                "reference": list(refs),
                "exact_match": [
                    float(exact_match([r], [o]) or 0.0) if r else None
                    for r, o in zip(refs, outs, strict=True)
                ],
            }
        metrics["samples"] = [
            {"prompt": processor.decode(p, skip_special_tokens=False)[-500:], "reference": r, "output": o}
            for p, r, o in list(zip(prompts, refs, outs, strict=True))[:8]
        ]
        return metrics

    @torch.no_grad()
    def generate_ids(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        prompts: list[list[int]],
        *,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        adapter_names: list[str] | None = None,
        synced: bool = False,
    ) -> list[str]:
        """Answers for tokenized prompts (left-padded batches), stopping at the end-of-turn token.

        ``adapter_names`` (one per prompt) runs a peft mixed-adapter batch: each row with its adapter.
        ``synced``: the model is sharded (FSDP); every rank keeps stepping until all ranks are done.
        """
        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        stops = end_of_turn_ids(tokenizer, getattr(model, "get_base_model", lambda: model)())
        if seed is not None:
            torch.manual_seed(seed)
        outs: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = torch.tensor(p)
                attn[i, width - len(p) :] = 1
            kwargs: dict[str, Any] = {"do_sample": do_sample}
            if do_sample:
                kwargs |= {"temperature": temperature, "top_p": top_p}
            else:
                kwargs |= {"temperature": None, "top_p": None, "top_k": None}
            if adapter_names is not None:
                kwargs["adapter_names"] = adapter_names[start : start + batch_size]
            if synced:
                kwargs["synced_gpus"] = True
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=stops,
                pad_token_id=pad,
                **kwargs,
            )
            for row in gen[:, width:].tolist():
                cut = next((j for j, t in enumerate(row) if t in stops), len(row))
                outs.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return outs

    def prompt_ids(
        self, tokenizer: Any, data_cfg: CausalLMData, text: str, *, system: str | None = None
    ) -> list[int]:
        """A user message rendered with the tokenizer's chat template (set by :meth:`predict` /
        :meth:`preprocess`) and a generation prompt, as token ids."""
        messages = [{"role": "user", "content": text}]
        system = system or data_cfg.system_prompt
        if system:
            messages.insert(0, {"role": "system", "content": system})
        if data_cfg.instruction_template and data_cfg.prompt_format != "chat":
            # Adapters trained from a template expect the same wrapping around a raw input.
            import string

            fields = [f for _, f, _, _ in string.Formatter().parse(data_cfg.instruction_template) if f]
            if len(set(fields)) == 1:
                messages[-1]["content"] = data_cfg.instruction_template.format(**{fields[0]: text})
        return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]

    def chat_prompt_ids(
        self, tokenizer: Any, data_cfg: CausalLMData, messages: list[dict[str, str]]
    ) -> list[int]:
        """A conversation (OpenAI-style messages) rendered with the adapter's chat template, ready for
        the assistant's next turn. A single user message is wrapped like :meth:`prompt_ids` does."""
        self._with_template(tokenizer, data_cfg)
        if len(messages) == 1 and messages[0]["role"] == "user":
            return self.prompt_ids(tokenizer, data_cfg, messages[0]["content"])
        if data_cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": data_cfg.system_prompt}, *messages]
        return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]

    def serve_batch(
        self,
        model: torch.nn.Module,
        processor: Any,
        rows: list[Any],
        options: GenerateOptions,
        **adapter_kwargs: Any,
    ) -> list[Any]:
        """Answers to tokenized chat prompts, with the request's options (the same for every row)."""
        return self.generate_ids(
            model,
            processor,
            rows,
            max_new_tokens=options.max_new_tokens,
            batch_size=len(rows),
            do_sample=options.do_sample,
            temperature=options.temperature,
            top_p=options.top_p,
            **adapter_kwargs,
        )

    def report_sections(self, split: str, metrics: dict[str, Any], label_space: Any) -> list[ReportSection]:
        """Sample generations: the prompt, the reference answer and the adapter's."""
        if not metrics.get("samples"):
            return []
        rows = [[s["prompt"], s["reference"], s["output"]] for s in metrics["samples"]]
        return [
            ReportTable(f"Sample generations: {split}", ["prompt", "reference", "output"], rows, "samples")
        ]

    def generate(
        self,
        model: torch.nn.Module,
        processor: Any,
        prompts: list[str],
        data_cfg: CausalLMData,
        *,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int | None = None,
        system: str | None = None,
    ) -> list[dict[str, Any]]:
        self._with_template(processor, data_cfg)
        ids = [self.prompt_ids(processor, data_cfg, str(t), system=system) for t in prompts]
        outs = self.generate_ids(
            model,
            processor,
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        return [{"input": str(t), "output": o} for t, o in zip(prompts, outs, strict=True)]

    # ---- export ---------------------------------------------------------------------------------
    def export_batches(self, processor: Any, data_cfg: CausalLMData) -> list[dict[str, torch.Tensor]]:
        self._with_template(processor, data_cfg)
        prompts = [
            self.prompt_ids(processor, data_cfg, t)
            for t in ("Write a haiku about autumn.", "Hi", "Name three colours of the rainbow, please.")
        ]

        def batch(rows: list[list[int]]) -> dict[str, torch.Tensor]:
            width = max(map(len, rows))
            pad = processor.pad_token_id if processor.pad_token_id is not None else 0
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attn = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):  # left padding, as in generation
                ids[i, width - len(r) :] = torch.tensor(r)
                attn[i, width - len(r) :] = 1
            return {"input_ids": ids, "attention_mask": attn}

        return [batch(prompts), batch(prompts[1:2]), batch(prompts[:2])]

    def save_merged(self, model: torch.nn.Module, folder: Path, loaded: Any) -> None:
        model.save_pretrained(str(folder), safe_serialization=True)
        if loaded.data_cfg is not None:
            self._with_template(
                loaded.processor, loaded.data_cfg
            )  # the template the adapter was trained with
        loaded.processor.save_pretrained(str(folder))

    def load_merged(self, folder: Path, loaded: Any) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(str(folder)).eval()

    def usage(self, meta: dict[str, Any]) -> list[str]:
        base = meta["base_model"]
        where = base.get("resolved") or base["name_or_path"]
        gguf = Path(where).name if where.endswith(".gguf") else None
        folder = str(Path(where).parent) if gguf else where
        extra = f", gguf_file={gguf!r}" if gguf else ""
        return [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"base = AutoModelForCausalLM.from_pretrained({folder!r}{extra})",
            'model = PeftModel.from_pretrained(base, "ADAPTER_DIR").eval()',
            f"tokenizer = AutoTokenizer.from_pretrained({folder!r}{extra})",
        ]
