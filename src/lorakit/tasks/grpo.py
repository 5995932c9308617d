"""Online RL for causal-LM adapters: GRPO (group relative policy optimisation) with reward functions.

Each training batch is B prompts. The policy pi (base + the adapter being trained) answers each prompt
G times by sampling (``train.num_generations``, the KV cache in one batched ``generate``); every answer
gets a reward r = sum_k w_k r_k from the configured rewards (Python functions with TRL's signature,
built-in checks, or a lorakit classifier adapter's probability of a label). Within each prompt's group
of G answers (Shao et al. 2024, DeepSeekMath, eq. 3; Liu et al. 2025, Dr. GRPO):

    A_i   = (r_i - mean(r_group)) / (std(r_group) + 1e-4)     scale_rewards: group (batch: std over
                                                               the batch; none: no division, Dr. GRPO)
    rho_t = pi(y_t | x, y_<t) / pi_old(y_t | x, y_<t)          per answer token t
    l_t   = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps_high) A_i) + beta KL_t
    KL_t  = exp(q_t - p_t) - (q_t - p_t) - 1                    k3 estimator, q = log pi_ref, p = log pi

pi_old is the policy that sampled the answers: the same weights at the first of ``num_iterations``
optimizer steps on a batch (rho = 1, gradients flow through pi), the sampling-time log-probabilities
afterwards. pi_ref is the adapter switched off (peft ``disable_adapter``): no second copy of the base.
Losses (``train.loss_type``, as TRL's GRPOTrainer): ``grpo`` averages l over each answer's tokens, then
over answers; ``dapo`` / ``bnpo`` over all answer tokens of the batch; ``dr_grpo`` sums and divides by
answers x ``max_completion_length``. Log-probabilities are of logits / temperature, as sampled.

Shapes: prompts [B, P] left-padded; answers [B*G, T] right-padded, masked after their end-of-turn token
(which is learned). Rows, chat rendering, generation for `lorakit generate`, model loading, export and
serving are the causal-LM task's (:class:`~lorakit.tasks.causal_lm.CausalLM`): a GRPO adapter is a
causal-LM adapter. This file adds prompts, rewards, rollouts, the loss and its metrics.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import string
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lorakit.config.schema import DataConfig, RunConfig, TrainConfig
from lorakit.data.batching import column_values
from lorakit.data.sources import build_splits, require_columns
from lorakit.errors import DataError, LorakitError
from lorakit.tasks.base import PreparedData, ReportSection, ReportTable
from lorakit.tasks.causal_lm import (
    CausalLM,
    CausalLMData,
    CausalLMTrain,
    end_of_turn_ids,
    logits_keep_mode,
    normalise_answer,
)
from lorakit.tasks.preference import as_reference

BUILTINS = ("exact_match", "regex", "format", "length")


class RewardError(LorakitError):
    """A reward function failed, or returned something that is not one number per answer."""


# ---- config -------------------------------------------------------------------------------------


class RewardConfig(BaseModel):
    """One reward: a function (built-in or your own) or a classifier adapter, and its weight."""

    model_config = ConfigDict(extra="forbid")

    function: str | None = Field(
        None,
        description="A built-in (`exact_match`, `regex`, `format`, `length`) or your own function as "
        "`module:function` or `path/to/file.py:function` (relative to the working directory), called "
        "as TRL's reward functions are: (prompts, completions, completion_ids, **columns) -> one float "
        "per completion (None where it does not apply).",
    )
    adapter: str | None = Field(
        None,
        description="A lorakit classifier adapter (folder or run folder) used as a reward model: the "
        "reward is its probability of `label` for the text `template` makes.",
    )
    label: str | None = Field(None, description="adapter: the label whose probability is the reward.")
    template: str = Field(
        "{completion}",
        description="adapter: the text the classifier rates; {completion}, {prompt} and the data's "
        "columns are filled in, e.g. '{opening} {completion}'.",
    )
    column: str | None = Field(
        None,
        description="exact_match: the column with the expected answer (label indices are named by "
        "data.label_names); regex: a column with a pattern per row.",
    )
    pattern: str | None = Field(
        None,
        description="regex: the pattern an answer must contain; format: the pattern the whole answer "
        "must match (Python `re`, DOTALL).",
    )
    max_tokens: int | None = Field(
        None,
        gt=0,
        description="length: answers longer than this many tokens get -(extra tokens / max_tokens).",
    )
    weight: float = Field(1.0, allow_inf_nan=False, description="The reward's weight in the sum.")
    name: str | None = Field(None, description="The reward's name in logs and reports (default: derived).")

    @model_validator(mode="after")
    def _complete(self) -> RewardConfig:
        if (self.function is None) == (self.adapter is None):
            raise ValueError("give exactly one of `function` (built-in or yours) or `adapter` (a classifier)")
        if self.adapter is not None:
            if not self.label:
                raise ValueError("an adapter reward needs `label`: the label whose probability is the reward")
            _template_fields(self.template)
            return self
        needs = {"exact_match": ("column",), "format": ("pattern",), "length": ("max_tokens",)}
        for key in needs.get(self.function or "", ()):
            if getattr(self, key) is None:
                raise ValueError(f"the {self.function} reward needs `{key}`")
        if self.function == "regex" and (self.pattern is None) == (self.column is None):
            raise ValueError("the regex reward needs one of `pattern` (the same for all rows) or `column`")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(
                    f"pattern {self.pattern!r} is not a valid regular expression: {exc}"
                ) from None
        if self.function not in BUILTINS:
            resolve_function(self.function or "")  # importable and callable, before any model is loaded
        return self

    @property
    def label_text(self) -> str:
        """The reward's name in metrics (``reward_<label_text>``)."""
        if self.name:
            return self.name
        if self.adapter is not None:
            return f"{Path(self.adapter).name or 'adapter'}_{self.label}"
        return (self.function or "").rsplit(":", 1)[-1]


class GRPOData(CausalLMData):
    """Prompts (plus any columns the rewards read) for online RL."""

    prompt_column: str = Field(
        "prompt",
        description="grpo: column with the prompt: a string (one user message) or a list of chat messages; "
        "or build it from columns with `instruction_template`.",
    )


class GRPOTrainConfig(CausalLMTrain):
    """Optimisation, sampling, rewards and the GRPO loss."""

    rewards: list[RewardConfig] = Field(
        default_factory=list,
        description="grpo: the rewards, summed with their weights: [{function: ..., weight: ...}, "
        "{adapter: ..., label: ...}].",
    )
    num_generations: int = Field(8, ge=2, description="grpo: answers sampled per prompt (G, the group).")
    max_completion_length: int = Field(
        64, ge=1, description="grpo: longest sampled answer, in tokens (longer ones are cut)."
    )
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="grpo: sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="grpo: nucleus sampling (1 = the whole vocabulary).")
    beta: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="grpo: weight of the KL penalty to the reference (the base without the adapter); "
        "0 = none (no reference pass).",
    )
    epsilon: float = Field(
        0.2, gt=0, lt=1, description="grpo: clipping range of the policy ratio (low side)."
    )
    epsilon_high: float | None = Field(
        None, gt=0, description="grpo: clipping range above 1 (DAPO's clip-higher); unset = epsilon."
    )
    num_iterations: int = Field(
        1, ge=1, description="grpo: optimizer steps on each batch of sampled answers (mu in the paper)."
    )
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "dapo",
        description="grpo: how the per-token losses are averaged: `grpo` per answer then over answers, "
        "`dapo` / `bnpo` over all answer tokens, `dr_grpo` over answers x max_completion_length.",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="grpo: divide advantages by the group's reward std (`group`), the batch's (`batch`) "
        "or not at all (`none`, as Dr. GRPO).",
    )
    mask_truncated_completions: bool = Field(
        False, description="grpo: leave answers cut at max_completion_length out of the loss."
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="grpo: longest answer at evaluations; unset = max_completion_length."
    )
    generation_samples: int = Field(
        64,
        ge=1,
        description="grpo: validation / test prompts answered greedily and scored at each evaluation.",
    )
    gradient_checkpointing: bool | float = Field(
        False, description=TrainConfig.model_fields["gradient_checkpointing"].description
    )

    @model_validator(mode="after")
    def _has_rewards(self) -> GRPOTrainConfig:
        if not self.rewards:
            raise ValueError(
                "train.rewards: give at least one reward, e.g. [{function: exact_match, column: answer}]"
            )
        return self


# ---- reward functions -----------------------------------------------------------------------------

_FILES: dict[str, Any] = {}


def resolve_function(spec: str) -> Callable[..., Any]:
    """The callable named ``module:function`` or ``path/to/file.py:function``.

    Raises:
        ValueError: It cannot be imported, or is not callable (a config error, at load time).
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(
            f"function {spec!r} is not a built-in ({', '.join(BUILTINS)}) nor `module:function` / "
            "`file.py:function`"
        )
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            if not path.is_file():
                raise ValueError(f"function {spec!r}: no file {where}")
            if str(path) not in _FILES:
                module_spec = importlib.util.spec_from_file_location(f"lorakit_rewards_{path.stem}", path)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
                _FILES[str(path)] = module
            module = _FILES[str(path)]
        else:
            sys.path.insert(0, str(Path.cwd()))
            try:
                module = importlib.import_module(where)
            finally:
                sys.path.remove(str(Path.cwd()))
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(
            f"function {spec!r}: importing {where} failed: {type(exc).__name__}: {exc}"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"function {spec!r}: {where} has no function {name!r}")
    return fn


def _template_fields(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError as exc:
        raise ValueError(f"template {template!r}: {exc}") from None


def _label_named(value: Any, names: list[str] | None) -> str:
    """A column value as answer text: label indices are named by ``data.label_names``."""
    if (
        names
        and isinstance(value, (int, np.integer))
        and not isinstance(value, bool)
        and 0 <= value < len(names)
    ):
        return names[int(value)]
    return "" if value is None else str(value)


def builtin_reward(spec: RewardConfig, label_names: list[str] | None) -> Callable[..., list[float]]:
    """A built-in reward as a function with TRL's signature (completions as plain text here)."""
    if spec.function == "exact_match":

        def exact(completions: list[str], **columns: Any) -> list[float]:
            refs = columns[spec.column]
            return [
                float(normalise_answer(c) == normalise_answer(_label_named(r, label_names)))
                for c, r in zip(completions, refs, strict=True)
            ]

        return exact
    if spec.function in ("regex", "format"):
        fixed = re.compile(spec.pattern, re.DOTALL) if spec.pattern is not None else None

        def matches(completions: list[str], **columns: Any) -> list[float]:
            patterns = (
                [fixed] * len(completions) if fixed else [re.compile(str(p)) for p in columns[spec.column]]
            )
            test = "fullmatch" if spec.function == "format" else "search"
            return [
                float(bool(getattr(p, test)(c.strip()))) for p, c in zip(patterns, completions, strict=True)
            ]

        return matches

    def length(completions: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
        limit = spec.max_tokens or 1
        return [-max(0, len(ids) - limit) / limit for ids in completion_ids]

    return length


def checked_rewards(values: Any, name: str, n: int, rows: list[dict[str, Any]], g: int) -> list[float]:
    """One float per completion (None -> NaN: the reward does not apply), or a one-line error naming
    the reward, the data row and what came back."""
    if not isinstance(values, (list, tuple, np.ndarray, torch.Tensor)) or len(values) != n:
        got = f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__
        raise RewardError(
            f"reward {name}: returned {got} for {n} completions; return one float per completion"
        )
    out = []
    for j, v in enumerate(values.tolist() if hasattr(values, "tolist") else values):
        row = rows[j // g].get("__row__", j // g)
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RewardError(
                f"reward {name}: returned {v!r} ({type(v).__name__}) for completion {j % g} of data row "
                f"{row}; return a float"
            )
        if not math.isfinite(v):
            raise RewardError(
                f"reward {name}: returned {v} for completion {j % g} of data row {row}; return a finite "
                "float (or None where the reward does not apply)"
            )
        out.append(float(v))
    return out


def group_advantages(rewards: torch.Tensor, g: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], each answer's group reward std [N]) of rewards [N] in groups of ``g``; NaN
    rewards (no reward applied) are left out of the group's statistics and get advantage 0."""
    grouped = rewards.view(-1, g)
    mean = torch.nanmean(grouped, 1, keepdim=True)
    count = (~grouped.isnan()).sum(1, keepdim=True)
    var = torch.nanmean((grouped - mean) ** 2, 1, keepdim=True) * count / (count - 1).clamp(min=1)
    std = var.sqrt().expand_as(grouped).reshape(-1)
    adv = (grouped - mean).reshape(-1)
    if scale == "group":
        adv = adv / (std + 1e-4)
    elif scale == "batch":
        valid = rewards[~rewards.isnan()]
        adv = adv / ((valid.std() if len(valid) > 1 else torch.tensor(0.0)) + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), std


# ---- log-probabilities ------------------------------------------------------------------------------


def completion_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float
) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of every answer token [N, T], from logits / temperature. Positions follow the
    attention mask (left-padded prompts keep the positions they had when sampled). When the batch's rows
    come in groups that share their prompt (``group_size`` G > 1, as rollouts make them), each prompt runs
    through the model once and its keys and values serve the G answers (:func:`_shared_prompt_logits`)."""
    t = batch["completion_mask"].shape[1]
    if batch.get("group_size", 1) > 1 and _can_share_prompts(model):
        logits = _shared_prompt_logits(model, batch, t)
    else:
        ids, attn = batch["input_ids"], batch["attention_mask"]
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        keep = {"logits_to_keep": t + 1} if logits_keep_mode(model) != "none" else {}
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, **keep)
        logits = out.logits[:, -(t + 1) : -1]
    logits = logits.float() / temperature
    targets = batch["input_ids"][:, -t:]
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


def _can_share_prompts(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward can take a prompt cache with gradients: not under DDP / FSDP (one
    forward per backward) nor with gradient checkpointing in training (no cache where layers replay)."""
    if hasattr(model, "module"):
        return False
    return not (model.training and getattr(model, "is_gradient_checkpointing", False))


def repeated_prompt_cache(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, g: int
) -> tuple[Any, Any, str]:
    """Prompts [B, P] (left-padded) through ``model`` once with ``use_cache``: (the output, its cache
    repeated ``g`` times for the G answers of each prompt, the keyword a forward or ``generate`` takes
    it by: ``cache`` in transformers >= 5.x, else ``past_key_values``)."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    name = "cache" if hasattr(out, "cache") else "past_key_values"
    cache = getattr(out, name)
    cache.batch_repeat_interleave(g)
    return out, cache, name


def _shared_prompt_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], t: int) -> torch.Tensor:
    """The logits [N, T, V] that predict each answer token, with each group's prompt run once: prompts
    [B, P] (every G-th row) with ``use_cache``, the cache repeated G times, then the answers [N, T] on
    top of it. The cached keys and values keep their gradients, so the loss reaches the prompt's share
    of the LoRA weights as in the full pass; the logits are the full pass's up to float rounding."""
    g = batch["group_size"]
    ids, attn = batch["input_ids"], batch["attention_mask"]
    width = ids.shape[1] - t
    prompt_ids, prompt_mask = ids[::g, :width], attn[::g, :width]
    prompt, cache, name = repeated_prompt_cache(model, prompt_ids, prompt_mask, g)
    start = prompt_mask.sum(1).repeat_interleave(g)  # each answer's first position
    answers = model(
        input_ids=ids[:, width:],
        attention_mask=attn,
        position_ids=start[:, None] + torch.arange(t, device=ids.device)[None, :],
        logits_to_keep=t,
        **{name: cache},
    )
    first = prompt.logits[:, -1:].repeat_interleave(g, 0)  # the prompt's last position: the first token
    return torch.cat([first, answers.logits[:, :-1]], 1)


class GRPO(CausalLM):
    """Prompts and rewards -> a causal-LM adapter, by online RL (GRPO, DAPO, Dr. GRPO)."""

    name = "grpo"
    default_metric = "reward"
    data_config: ClassVar[type[DataConfig]] = GRPOData
    train_config: ClassVar[type[TrainConfig]] = GRPOTrainConfig
    curve_metrics = ("reward", "kl_sampled")
    lower_is_better = ("kl_sampled", "perplexity")

    def __init__(self) -> None:
        self.train_cfg: GRPOTrainConfig | None = None  # set by prepare
        self.data_cfg: GRPOData | None = None
        self.tokenizer: Any = None
        self.judges: dict[str, Any] = {}  # config key -> loaded classifier adapter

    # ---- data -----------------------------------------------------------------------------------
    def columns(self, data_cfg: GRPOData) -> list[str]:
        if data_cfg.instruction_template:
            return sorted(set(_template_fields(data_cfg.instruction_template)))
        return [data_cfg.prompt_column]

    def prepare(self, cfg: RunConfig, processor: Any) -> PreparedData:
        self.train_cfg, self.data_cfg, self.tokenizer = cfg.train, cfg.data, processor
        d = cfg.data

        def encode(ds: Dataset, key: str) -> Dataset:
            require_columns(ds, self.columns(d), key=key, data_cfg=d)
            for i, r in enumerate(cfg.train.rewards):  # the columns the rewards read
                if r.column:
                    require_columns(ds, [r.column], key=key, field=f"train.rewards.{i}.column")
            return ds

        raw = build_splits(d, columns=self.columns(d), encode=encode)
        splits, cut = {}, {}
        for name, ds in raw.items():
            splits[name], cut[name] = self._encode_split(ds, processor, d, key=f"data.{name}")
        lengths = np.asarray(column_values(splits["train"], "length"))
        warnings = [
            f"data.{split}: {n} prompt(s) longer than data.max_length={d.max_length} lost their start"
            for split, n in cut.items()
            if n
        ]
        stats = {
            "sizes": {k: len(v) for k, v in raw.items()},
            "columns": raw["train"].column_names,
            "warnings": warnings,
            "train_tokens": {
                "mean": float(lengths.mean()),
                "max": int(lengths.max()),
                "truncated": cut["train"],
            },
        }
        return PreparedData(DatasetDict(splits), processor, None, stats)

    def preprocess(
        self, ds: Dataset, processor: Any, data_cfg: GRPOData, label_space: Any, *, key: str
    ) -> Dataset:
        return self._encode_split(ds, processor, data_cfg, key=key)[0]

    def _prompt(self, row: dict[str, Any], d: GRPOData, *, key: str, index: int) -> Any:
        """The prompt of a row as the rewards see it: a string, or chat messages."""
        if d.instruction_template:
            try:
                return d.instruction_template.format(**row)
            except (KeyError, IndexError, ValueError) as exc:
                raise DataError(
                    f"data.instruction_template: cannot fill it from row {index} of {key}: {exc}"
                ) from None
        value = row[d.prompt_column]
        if isinstance(value, list) and value:
            return value
        if not isinstance(value, str) or not value.strip():
            raise DataError(
                f"{key}: row {index}: '{d.prompt_column}' is not a prompt (a string or a list of chat "
                "messages)"
            )
        return value

    def _messages(self, prompt: Any, d: GRPOData, *, key: str, index: int) -> list[dict[str, str]]:
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            rk, ck = d.message_keys.get("role", "role"), d.message_keys.get("content", "content")
            messages = []
            for m in prompt:
                if not isinstance(m, dict) or rk not in m or ck not in m:
                    raise DataError(
                        f"{key}: row {index}: a message lacks '{rk}' / '{ck}'; set data.message_keys"
                    )
                role = d.role_names.get(str(m[rk]), str(m[rk]))
                if role not in ("system", "user", "assistant"):
                    raise DataError(
                        f"{key}: row {index}: role '{m[rk]}' is not system / user / assistant; map it with "
                        "data.role_names"
                    )
                messages.append({"role": role, "content": "" if m[ck] is None else str(m[ck])})
        if d.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": d.system_prompt})
        return messages

    def _encode_split(
        self, ds: Dataset, processor: Any, data_cfg: GRPOData, *, key: str
    ) -> tuple[Dataset, int]:
        """Prompt token ids (the last data.max_length), the prompt and the row for the rewards."""
        d = data_cfg
        text_prompts = d.prompt_format == "text"
        if not text_prompts:
            self._with_template(processor, d)
        ids_all, prompts, rows, cut = [], [], [], 0
        for i, row in enumerate(ds):
            prompt = self._prompt(row, d, key=key, index=i)
            if text_prompts:
                ids = processor(str(prompt), add_special_tokens=True, verbose=False)["input_ids"]
            else:
                rendered = processor.apply_chat_template(
                    self._messages(prompt, d, key=key, index=i), tokenize=False, add_generation_prompt=True
                )
                ids = processor(rendered, add_special_tokens=False, verbose=False)["input_ids"]
            cut += len(ids) > d.max_length
            ids_all.append(ids[-d.max_length :])
            prompts.append(json.dumps(prompt, ensure_ascii=False))
            rows.append(json.dumps({**row, "__row__": i}, ensure_ascii=False, default=str))
        return Dataset.from_dict(
            {"prompt_ids": ids_all, "prompt": prompts, "row": rows, "length": [len(x) for x in ids_all]}
        ), cut

    def collate(self, processor: Any, data_cfg: GRPOData, *, train: bool = False) -> Any:
        pad = processor.pad_token_id if processor.pad_token_id is not None else 0

        def collate_fn(examples: list[dict[str, Any]]) -> dict[str, Any]:
            width = max(len(ex["prompt_ids"]) for ex in examples)
            ids = torch.full((len(examples), width), pad, dtype=torch.long)
            mask = torch.zeros((len(examples), width), dtype=torch.long)
            for i, ex in enumerate(examples):  # left padding, as generation wants
                n = len(ex["prompt_ids"])
                ids[i, width - n :], mask[i, width - n :] = torch.tensor(ex["prompt_ids"]), 1
            return {
                "prompt_ids": ids,
                "prompt_mask": mask,
                "prompts": [json.loads(ex["prompt"]) for ex in examples],
                "rows": [json.loads(ex["row"]) for ex in examples],
            }

        return collate_fn

    # ---- reward models --------------------------------------------------------------------------
    def helper_adapters(self, cfg: RunConfig) -> dict[str, str]:
        return {f"train.rewards.{i}.adapter": r.adapter for i, r in enumerate(cfg.train.rewards) if r.adapter}

    def use_helpers(self, loaded: dict[str, Any]) -> None:
        rewards = self.train_cfg.rewards if self.train_cfg else []
        for key, judge in loaded.items():
            spec = rewards[int(key.split(".")[2])]
            if judge.task.cli_command != "predict" or judge.label_space is None:
                raise RewardError(
                    f"{key}: '{spec.adapter}' is a {judge.task.name} adapter; a reward model must be a "
                    "classifier (text-classification)"
                )
            if spec.label not in judge.label_space.labels:
                raise RewardError(
                    f"{key}: the classifier has no label {spec.label!r}; choose one of "
                    f"{', '.join(judge.label_space.labels)}"
                )
        self.judges = dict(loaded)

    # ---- rewards --------------------------------------------------------------------------------
    def score(
        self, prompts: list[Any], texts: list[str], ids: list[list[int]], rows: list[dict[str, Any]], g: int
    ) -> torch.Tensor:
        """Rewards [N, K] of N = len(rows) * g answers (row i's answers at i*g ... i*g + g - 1)."""
        cfg, d = self.train_cfg, self.data_cfg
        each_prompt = [p for p in prompts for _ in range(g)]
        each_row = [r for r in rows for _ in range(g)]
        columns = {k: [r.get(k) for r in each_row] for k in rows[0] if k != "__row__"}
        chat = isinstance(each_prompt[0], list)
        out = []
        for i, spec in enumerate(cfg.rewards):
            name = f"train.rewards.{i} ({spec.label_text})"
            if spec.adapter is not None:
                values = self._judge(i, spec, each_prompt, texts, each_row)
            elif spec.function in BUILTINS:
                values = builtin_reward(spec, d.label_names)(completions=texts, completion_ids=ids, **columns)
            else:
                fn = resolve_function(spec.function)
                completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
                try:
                    values = fn(prompts=each_prompt, completions=completions, completion_ids=ids, **columns)
                except Exception as exc:
                    raise RewardError(
                        f"reward {name}: {spec.function} raised {type(exc).__name__}: {str(exc)[:200]} on "
                        f"data row {rows[0].get('__row__')} and the {len(rows) - 1} after it; fix it"
                    ) from None
            out.append(checked_rewards(values, name, len(texts), rows, g))
        return torch.tensor(out, dtype=torch.float32).T

    @torch.no_grad()
    def _judge(
        self, i: int, spec: RewardConfig, prompts: list[Any], texts: list[str], rows: list[dict[str, Any]]
    ) -> list[float]:
        judge = self.judges.get(f"train.rewards.{i}.adapter")
        if judge is None:
            raise RewardError(
                f"train.rewards.{i}: the reward model {spec.adapter} is not loaded here; score adapter "
                "rewards in `lorakit train` (its evaluations and test split)"
            )
        inputs = []
        for p, t, r in zip(prompts, texts, rows, strict=True):
            shown = p if isinstance(p, str) else (p[-1].get("content", "") if p else "")
            try:
                inputs.append(spec.template.format(**{**r, "prompt": shown, "completion": t}))
            except (KeyError, IndexError, ValueError) as exc:
                raise RewardError(
                    f"train.rewards.{i}.template: cannot fill it from data row {r.get('__row__')}: {exc}"
                ) from None
        records = judge.task.predict(
            judge.model,
            judge.processor,
            inputs,
            judge.label_space,
            judge.data_cfg,
            top_k=judge.label_space.num_labels,
        )
        return [next(a["score"] for a in rec["top_k"] if a["label"] == spec.label) for rec in records]

    # ---- rollouts -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        model: torch.nn.Module,
        ids: torch.Tensor,
        mask: torch.Tensor,
        *,
        greedy: bool,
        max_new_tokens: int,
        temperature: float | None = None,
        top_p: float | None = None,
        group: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(answer ids [N, T], answer mask [N, T]: up to and with the end-of-turn token, truncated [N])
        for prompts [B, P], each answered ``group`` times (N = B * group, row i's answers at i * group
        ...); sampled at ``train.temperature`` / ``top_p`` unless given. Each prompt is read once: its
        keys and values (all but the last token) are repeated for its group before generation starts."""
        cfg, tok = self.train_cfg, self.tokenizer
        stops = end_of_turn_ids(tok, getattr(model, "get_base_model", lambda: model)())
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        was_training = model.training
        model.eval()  # no dropout; gradient checkpointing (training mode only) would switch the cache off
        options: dict[str, Any] = (
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            if greedy
            else {
                "do_sample": True,
                "temperature": cfg.temperature if temperature is None else temperature,
                "top_p": cfg.top_p if top_p is None else top_p,
                "top_k": 0,
            }
        )
        if group > 1 and ids.shape[1] > 1:  # every prompt token but the last read once for its group
            _, cache, name = repeated_prompt_cache(model, ids[:, :-1], mask[:, :-1], group)
            options[name] = cache
        ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad,
            **options,
        )
        model.train(was_training)
        answers = gen[:, ids.shape[1] :]
        is_stop = torch.isin(answers, torch.tensor(stops, device=answers.device))
        ended = is_stop.any(1)
        first = torch.where(ended, is_stop.int().argmax(1), answers.shape[1])
        cols = torch.arange(answers.shape[1], device=answers.device)
        answer_mask = (cols[None, :] <= first[:, None]).long() & (cols[None, :] < answers.shape[1])
        answers = torch.where(answer_mask.bool(), answers, pad)
        return answers, answer_mask, ~ended

    def _texts(self, answers: torch.Tensor, answer_mask: torch.Tensor) -> tuple[list[str], list[list[int]]]:
        ids = [row[: int(n)] for row, n in zip(answers.tolist(), answer_mask.sum(1).tolist(), strict=True)]
        return [self.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids], ids

    def rollout(
        self, model: torch.nn.Module, batch: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """G sampled answers per prompt, their rewards and group advantages, and (when needed) the
        sampling policy's and the reference's log-probabilities."""
        cfg, g = self.train_cfg, self.train_cfg.num_generations
        answers, answer_mask, truncated = self.sample(
            model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            greedy=False,
            max_new_tokens=cfg.max_completion_length,
            group=g,
        )
        ids = batch["prompt_ids"].repeat_interleave(g, 0)
        mask = batch["prompt_mask"].repeat_interleave(g, 0)
        texts, answer_ids = self._texts(answers, answer_mask)
        per_reward = self.score(batch["prompts"], texts, answer_ids, batch["rows"], g)
        weights = torch.tensor([r.weight for r in cfg.rewards])
        total = (per_reward * weights).nansum(1)
        total[per_reward.isnan().all(1)] = math.nan
        advantages, std = group_advantages(total, g, cfg.scale_rewards)
        loss_mask = answer_mask.clone()
        if cfg.mask_truncated_completions:
            loss_mask[truncated] = 0
        out = {
            "input_ids": torch.cat([ids, answers], 1),
            "attention_mask": torch.cat([mask, answer_mask], 1),
            "completion_mask": loss_mask,
            "advantages": advantages.to(ids.device),
            "group_size": g,  # rows i*g ... i*g + g - 1 answer the same prompt
        }
        with torch.no_grad():
            if cfg.num_iterations > 1:
                out["old_logps"] = completion_logps(model, out, cfg.temperature)
            if cfg.beta:
                with as_reference(model) as ref:
                    out["ref_logps"] = completion_logps(ref, out, cfg.temperature)
        lengths = answer_mask.sum(1).float()
        metrics = {
            "reward": float(torch.nanmean(total)),
            "reward_std": float(std.view(-1, g)[:, 0].nanmean()),
            "frac_reward_zero_std": float((std.view(-1, g)[:, 0] < 1e-6).float().mean()),
            "completion_length": float(lengths.mean()),
            "completion_length_max": float(lengths.max()),
            "truncated_ratio": float(truncated.float().mean()),
        }
        for spec, column in zip(cfg.rewards, per_reward.T, strict=True):
            metrics[f"reward_{spec.label_text}"] = float(torch.nanmean(column))
            metrics[f"reward_{spec.label_text}_std"] = (
                float(column[~column.isnan()].std()) if len(column) > 1 else 0.0
            )
        return out, metrics

    # ---- loss -----------------------------------------------------------------------------------
    def updates_per_batch(self, train_cfg: TrainConfig) -> int:
        return train_cfg.num_iterations

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self.loss_with_metrics(model, batch)[0]

    def loss_with_metrics(
        self, model: torch.nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped policy-ratio loss (plus beta x KL), normalised as ``train.loss_type`` says."""
        cfg = self.train_cfg
        logps = completion_logps(model, batch, cfg.temperature)
        mask = batch["completion_mask"].to(logps.dtype)
        old = batch.get("old_logps", logps.detach())
        adv = batch["advantages"][:, None]
        ratio = torch.exp(logps - old)
        low, high = 1 - cfg.epsilon, 1 + (cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon)
        per_token = -torch.min(ratio * adv, ratio.clamp(low, high) * adv)
        metrics: dict[str, float] = {}
        if cfg.beta:
            delta = batch["ref_logps"] - logps
            kl = torch.exp(delta) - delta - 1
            per_token = per_token + cfg.beta * kl
            metrics["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
        clipped = ((ratio < low) & (adv < 0)) | ((ratio > high) & (adv > 0))
        metrics["clip_ratio"] = float((clipped * mask).sum() / mask.sum().clamp(min=1))
        if cfg.loss_type == "grpo":
            loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
        elif cfg.loss_type == "dr_grpo":
            loss = (per_token * mask).sum() / (mask.shape[0] * cfg.max_completion_length)
        else:  # dapo, bnpo: over every answer token of the batch
            loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        return loss, metrics

    def loss_units(self, batch: dict[str, Any]) -> int:
        if self.train_cfg.loss_type in ("dapo", "bnpo"):
            return int(batch["completion_mask"].sum())
        return int(batch["completion_mask"].shape[0])

    # ---- evaluation -----------------------------------------------------------------------------
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
        """The mean reward of greedy answers to held-out prompts (each reward and their sum), their
        length, the KL from the reference of sampled answers (nats per answer), and samples."""
        from lorakit.data.batching import autocast, take, to_device

        t = cfg.train
        self.train_cfg, self.data_cfg, self.tokenizer = t, cfg.data, processor
        n = min(t.generation_samples, len(ds))
        collate = self.collate(processor, cfg.data)
        rewards, lengths, kls, samples = [], [], [], []
        for start in range(0, n, batch_size):
            batch = to_device(collate(take(ds, list(range(start, min(n, start + batch_size))))), device)
            with autocast(device, amp):
                answers, answer_mask, _ = self.sample(
                    model,
                    batch["prompt_ids"],
                    batch["prompt_mask"],
                    greedy=True,
                    max_new_tokens=t.max_new_tokens or t.max_completion_length,
                )
                texts, ids = self._texts(answers, answer_mask)
                rewards.append(self.score(batch["prompts"], texts, ids, batch["rows"], 1))
                lengths += answer_mask.sum(1).tolist()
                kls += self._sampled_kl(model, batch).tolist()
            samples += [
                {
                    "prompt": processor.decode(p, skip_special_tokens=False)[-300:],
                    "output": o,
                    "reward": float(r),
                }
                for p, o, r in zip(
                    ds[start : start + len(texts)]["prompt_ids"], texts, self._total(rewards[-1]), strict=True
                )
            ]
            if progress is not None:
                progress.update(len(texts))
        if progress is not None:
            progress.close()
        per_reward = torch.cat(rewards)
        metrics: dict[str, Any] = {
            "reward": float(np.nanmean(self._total(per_reward))),
            "completion_length": float(np.mean(lengths)),
            "kl_sampled": float(np.mean(kls)),
            "examples": n,
        }
        for spec, column in zip(t.rewards, per_reward.T, strict=True):
            metrics[f"reward_{spec.label_text}"] = float(torch.nanmean(column))
        # each prompt's reward, in split order: what `lorakit compare` pairs between runs
        metrics["predictions"] = {
            "prompt": [x["prompt"] for x in samples],
            "reward": [x["reward"] for x in samples],
        }
        metrics["samples"] = samples[:8]
        return metrics

    def _total(self, per_reward: torch.Tensor) -> list[float]:
        weights = torch.tensor([r.weight for r in self.train_cfg.rewards])
        return (per_reward * weights).nansum(1).tolist()

    def _sampled_kl(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """sum_t log pi(y_t) - log pi_ref(y_t) of one answer per prompt sampled from the policy [B] (an
        unbiased estimate of KL(pi || pi_ref) of whole answers, in nats)."""
        answers, answer_mask, _ = self.sample(
            model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            greedy=False,
            max_new_tokens=self.train_cfg.max_new_tokens or self.train_cfg.max_completion_length,
            temperature=1.0,
            top_p=1.0,
        )
        seq = {
            "input_ids": torch.cat([batch["prompt_ids"], answers], 1),
            "attention_mask": torch.cat([batch["prompt_mask"], answer_mask], 1),
            "completion_mask": answer_mask,
        }
        policy = completion_logps(model, seq, 1.0)
        with as_reference(model) as ref:
            reference = completion_logps(ref, seq, 1.0)
        return ((policy - reference) * answer_mask).sum(1).float().cpu()

    def report_sections(self, split: str, metrics: dict[str, Any], label_space: Any) -> list[ReportSection]:
        """Greedy answers to held-out prompts and their rewards."""
        if not metrics.get("samples"):
            return []
        rows = [[s["prompt"], s["output"], s["reward"]] for s in metrics["samples"]]
        return [ReportTable(f"Sample answers: {split}", ["prompt", "answer", "reward"], rows, "samples")]
