"""Preference tuning of causal-LM adapters: DPO, IPO and SimPO on (prompt, chosen, rejected) rows.

Each row is a prompt with two answers, the chosen one preferred. With the policy pi (base + the
adapter being trained), the reference pi_ref (the same base with the adapter switched off, or a
frozen starting adapter) and log-probabilities summed over the answer tokens, log pi(y|x):

    h(y)  = log pi(y|x) - log pi_ref(y|x)              the implicit reward is beta * h(y)
    dpo   = -log sigmoid(beta * (h(y_w) - h(y_l)))      Rafailov et al. 2023, eq. 7
    ipo   = (h'(y_w) - h'(y_l) - 1 / (2 beta))^2         Azar et al. 2023, eq. 17; h' averages per
                                                         token (as TRL)
    simpo = -log sigmoid(beta * (a(y_w) - a(y_l)) - gamma)   Meng et al. 2024; a = log pi / |y|, no reference

Shapes: a batch of B pairs is one model batch of 2B rows, the B chosen answers first, then the B
rejected ones, each row prompt + answer with labels on the answer tokens only (so one forward pass
gives both sides). The reference is the same weights: one more forward pass under ``no_grad`` with
the adapter switched off (peft ``disable_adapter``) -- no second copy of the base in memory. When
training starts from an instruction-tuned adapter (``train.reference_adapter``), peft holds it twice:
frozen as adapter ``reference`` and as the trainable ``default`` that starts from its weights (as
TRL's ``ref_adapter_name``).

Rows, chat rendering, answer masking, truncation, collation, generation and model loading are the
causal-LM task's (:class:`~lorakit.tasks.causal_lm.CausalLM`); this file adds pairs, the losses and
their metrics.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from pydantic import Field

from lorakit.config.schema import DataConfig, RunConfig, TrainConfig
from lorakit.data.batching import column_values
from lorakit.data.sources import build_splits
from lorakit.errors import DataError
from lorakit.runtime import distributed
from lorakit.tasks.base import PreparedData, ReportSection, ReportTable
from lorakit.tasks.causal_lm import (
    IGNORE,
    CausalLM,
    CausalLMData,
    CausalLMTrain,
    answer_logits,
    encode_example,
    logits_keep_mode,
    to_messages,
)

log = logging.getLogger("lorakit")
REFERENCE = "reference"  # peft adapter name of a frozen starting adapter


class PreferenceDataConfig(CausalLMData):
    """Preference pairs: a prompt and two answers, the chosen one preferred."""

    prompt_column: str = Field(
        "prompt",
        description="preference: column with the prompt: a string (one user message) or a list of chat "
        "messages. May be absent when chosen / rejected are whole conversations: the prompt "
        "is then the messages before their last answer.",
    )
    chosen_column: str = Field(
        "chosen",
        description="preference: column with the preferred answer: a string, or chat messages ending "
        "with the assistant's answer.",
    )
    rejected_column: str = Field(
        "rejected", description="preference: column with the other answer, in the shape of the chosen one."
    )


class PreferenceTrainConfig(CausalLMTrain):
    """Optimisation plus the preference loss."""

    gradient_checkpointing: bool | float = Field(
        False,
        description=TrainConfig.model_fields["gradient_checkpointing"].description
        + " Preference: off by default, as checkpointed passes cannot run each pair's prompt once.",
    )

    loss: Literal["dpo", "ipo", "simpo"] = Field(
        "dpo",
        description="preference: `dpo` (sigmoid), `ipo` (squared, per-token log-ratios) or `simpo` "
        "(reference-free, length-normalised, margin `simpo_gamma`).",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="preference: strength of the pull toward the reference (DPO / IPO: the KL weight; "
        "SimPO: the reward scale, 2-2.5 in the paper).",
    )
    simpo_gamma: float = Field(0.5, ge=0, description="preference, simpo: the target reward margin.")
    reference_adapter: str | None = Field(
        None,
        description="preference: a lorakit causal-LM adapter (folder or run folder) to start from: it is "
        "the frozen reference and the trained adapter starts from its weights (and its LoRA "
        "settings); unset = a new adapter on the bare base, which is the reference.",
    )
    generation_samples: int = Field(
        16,
        ge=0,
        description="preference: validation / test prompts answered at each evaluation (sampled at "
        "temperature 1 for the KL estimate; the first 8 also greedily, by policy and "
        "reference, for the report).",
    )


# ---- rows -> pairs ------------------------------------------------------------------------------


def _conversation(value: Any, d: DataConfig, role: str) -> list[Any]:
    """A column's value as a list of raw messages: a string is one message of ``role``."""
    if isinstance(value, list):
        return list(value)
    rk, ck = d.message_keys.get("role", "role"), d.message_keys.get("content", "content")
    return [{rk: role, ck: "" if value is None else str(value)}]


def pair_messages(
    row: dict[str, Any], d: PreferenceDataConfig, *, has_prompt: bool, key: str, index: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The chosen and the rejected conversation of a row (system / user / assistant messages, the
    answer last), through the causal-LM task's message reading (keys, role names, system prompt).

    Raises:
        DataError: Malformed messages, or chosen and rejected that continue different prompts.
    """
    prompt = _conversation(row[d.prompt_column], d, "user") if has_prompt else []
    ck = d.message_keys.get("content", "content")
    sides = []
    for col in (d.chosen_column, d.rejected_column):
        answer = _conversation(row[col], d, "assistant")
        last = answer[-1] if answer else None
        if not isinstance(last, dict) or not str(last.get(ck) or "").strip():
            sides.append([])  # an empty side: the caller counts and skips the row
            continue
        sides.append(to_messages({d.messages_column: prompt + answer}, d, "chat", key=key, index=index))
    chosen, rejected = sides
    if chosen and rejected and chosen[:-1] != rejected[:-1]:
        raise DataError(
            f"{key}: row {index}: '{d.chosen_column}' and '{d.rejected_column}' continue different "
            "prompts; give both the same messages before their answers, or put the prompt in "
            f"'{d.prompt_column}'"
        )
    return chosen, rejected


def _last_answer_only(labels: list[int]) -> list[int]:
    """Labels of the final answer alone (earlier assistant turns of a multi-turn prompt are context)."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE:
        start -= 1
    return [IGNORE] * start + labels[start:]


def encode_pair(
    tokenizer: Any, chosen: list[dict[str, str]], rejected: list[dict[str, str]], max_length: int
) -> dict[str, Any] | None:
    """Token ids and answer-only labels of both sides; ``cut`` as :func:`encode_example` (the worse side).
    None when a side lost its whole answer to truncation."""
    c, r = encode_example(tokenizer, chosen, max_length), encode_example(tokenizer, rejected, max_length)
    cut = max(c["cut"], r["cut"])
    if cut == 3:
        return None
    return {
        "chosen_input_ids": c["input_ids"],
        "chosen_labels": _last_answer_only(c["labels"]),
        "rejected_input_ids": r["input_ids"],
        "rejected_labels": _last_answer_only(r["labels"]),
        "prompt_ids": c["prompt_ids"],
        "reference": c["reference"],
        "length": max(len(c["input_ids"]), len(r["input_ids"])),
        "cut": cut,
    }


# ---- log-probabilities and losses ---------------------------------------------------------------


def answer_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's answer tokens [2B], answer token counts [2B])."""
    logits, targets, rows = answer_logits(model, batch)
    return row_logps(logits, targets, rows, len(batch["input_ids"]))


def pair_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], starts: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`answer_logits` for a batch of pairs (B chosen rows, then B rejected): each pair's prompt
    runs through the model once, not twice, when ``starts`` (:func:`shared_prompt_starts`) says where
    the answers begin; with None, the plain two-row pass. A step's policy and reference passes take the
    path decided from the policy model, so that in bf16 both carry the same rounding (at B = 0 the loss
    is then exactly log 2)."""
    return _shared_prompt_logits(model, batch, starts) if starts is not None else answer_logits(model, batch)


def shared_prompt_starts(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Where each row's answer starts [2B] when each pair's prompt can run through ``model`` once; None
    for the plain path, when: the model is wrapped for DDP / FSDP (they expect one forward per
    backward), it cannot take a 2-D ``logits_to_keep``, it trains with gradient checkpointing
    (transformers keeps no cache where a layer will be replayed), the batch carries more than ids, mask
    and labels (packing), or truncation left the two sides of a pair with different prompts."""
    if hasattr(model, "module") or logits_keep_mode(model) != "mask":
        return None
    if model.training and getattr(model, "is_gradient_checkpointing", False):
        return None
    return _prompt_starts(batch)


def _prompt_starts(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Where each row's answer starts [2B], when every pair's two rows hold the same prompt before it
    (and the batch is plain ids / mask / labels, not packed); else None."""
    ids, labels = batch["input_ids"], batch["labels"]
    if set(batch) != {"input_ids", "attention_mask", "labels"}:
        return None
    b, labelled = ids.shape[0] // 2, labels != IGNORE
    if not labelled.any(1).all():
        return None
    starts = labelled.int().argmax(1)  # each row's first answer token: the prompt is what comes before
    p = int(starts.max())
    if p == 0 or not torch.equal(starts[:b], starts[b:]):
        return None
    cols = torch.arange(p, device=ids.device)
    same = (ids[:b, :p] == ids[b:, :p]) | (cols >= starts[:b, None])
    return starts if bool(same.all()) else None


def _shared_prompt_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompt of each pair once (left-padded, its keys and values kept with their gradients), then
    both answers on top of it from that cache. Chosen and rejected share their prompt token for token, so
    the logits are the two-row pass's; with prompts longer than answers (the usual case) this is close
    to half the work."""
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    b, width, p = ids.shape[0] // 2, ids.shape[1], int(starts.max())
    lengths, cols = attn.sum(1), torch.arange(p, device=ids.device)
    # 1. prompts, left-padded to p; the last position predicts each answer's first token
    src = cols[None, :] - (p - starts[:b])[:, None]
    real = src >= 0
    prompt = model(
        input_ids=torch.where(real, ids[:b].gather(1, src.clamp(min=0)), 0),
        attention_mask=real.long(),
        position_ids=src.clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = prompt.cache if hasattr(prompt, "cache") else prompt.past_key_values  # transformers >= 5.x: cache
    cache.batch_repeat_interleave(2)  # row 2i: pair i's chosen answer, row 2i + 1: its rejected one
    # 2. the answers (right-padded) on the cached prompts, in that interleaved order
    order = torch.stack([torch.arange(b), torch.arange(b) + b], 1).reshape(-1).to(ids.device)
    n_ans = int((lengths - starts).max())
    pos = starts[order, None] + torch.arange(n_ans, device=ids.device)[None, :]
    inside = pos < lengths[order, None]
    nxt = pos + 1
    targets = torch.where(nxt < width, labels[order].gather(1, nxt.clamp(max=width - 1)), IGNORE)
    targets = torch.where(inside, targets, IGNORE)
    keep = targets != IGNORE
    answers = model(
        input_ids=torch.where(inside, ids[order].gather(1, pos.clamp(max=width - 1)), 0),
        attention_mask=torch.cat([real.repeat_interleave(2, 0), inside], 1).long(),
        position_ids=pos,
        logits_to_keep=keep,
        **{"cache" if hasattr(prompt, "cache") else "past_key_values": cache},
    )
    rows = torch.arange(2 * b, device=ids.device)
    first_targets = labels[rows, starts]
    return (
        torch.cat([prompt.logits[:, -1][rows % b], answers.logits]),
        torch.cat([first_targets, targets[keep]]),
        torch.cat([rows, order[keep.nonzero()[:, 0]]]),
    )


def pair_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], starts: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`answer_logps` of a batch of pairs, through :func:`pair_logits`."""
    return row_logps(*pair_logits(model, batch, starts), len(batch["input_ids"]))


def row_logps(
    logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of the targets' log-probabilities [n] and per-row token counts [n], from the flat
    answer positions that :func:`answer_logits` returns."""
    logp = -F.cross_entropy(logits.float(), targets, reduction="none")
    sums = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
    return sums, torch.bincount(rows, minlength=n)


def pair_losses(
    kind: str,
    beta: float,
    gamma: float,
    policy: torch.Tensor,
    reference: torch.Tensor | None,
    tokens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and the implicit rewards of the chosen and rejected answers [B] each.

    Args:
        kind: ``dpo``, ``ipo`` or ``simpo``.
        beta: The loss's beta; ``gamma``: SimPO's margin.
        policy: Summed answer log-probabilities of the policy, [2B] (chosen first).
        reference: The same under the reference (unused by SimPO).
        tokens: Answer token counts [2B].
    """
    b = policy.shape[0] // 2
    if kind == "simpo":
        rewards = beta * policy / tokens
        logits = rewards[:b] - rewards[b:] - gamma
        return -F.logsigmoid(logits), rewards[:b].detach(), rewards[b:].detach()
    assert reference is not None
    ratio = policy - reference
    if kind == "ipo":
        ratio = ratio / tokens
    h = ratio[:b] - ratio[b:]
    losses = -F.logsigmoid(beta * h) if kind == "dpo" else (h - 1 / (2 * beta)) ** 2
    rewards = beta * ratio.detach()
    return losses, rewards[:b], rewards[b:]


@contextlib.contextmanager
def as_reference(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The reference model: the frozen starting adapter when there is one, else the bare base.
    Yields the peft model to call (unwrapped from DDP: the reference pass has no backward)."""
    peft_model = getattr(model, "module", model)
    if REFERENCE not in getattr(peft_model, "peft_config", {}):
        with peft_model.disable_adapter():
            yield peft_model
        return
    active = peft_model.active_adapter
    trainable = any(p.requires_grad for n, p in peft_model.named_parameters() if f".{active}." in n)
    peft_model.set_adapter(REFERENCE, inference_mode=True)
    try:
        yield peft_model
    finally:
        peft_model.set_adapter(
            active, inference_mode=not trainable
        )  # peft's set_adapter also sets requires_grad


#: What an evaluation adds up over its batches (then over data-parallel ranks), by name.
EVAL_SUMS = ("loss", "correct", "margin", "reward_c", "reward_r", "logp_c", "logp_r", "kl_tok", "tokens")


class Preference(CausalLM):
    """Preference pairs -> a causal-LM adapter (DPO, IPO, SimPO)."""

    name = "preference"
    default_metric = "loss"
    data_config: ClassVar[type[DataConfig]] = PreferenceDataConfig
    train_config: ClassVar[type[TrainConfig]] = PreferenceTrainConfig
    curve_metrics = ("reward_accuracy", "reward_margin")

    def report_sections(self, split: str, metrics: dict[str, Any], label_space: Any) -> list[ReportSection]:
        """Greedy answers of the frozen reference and of the adapter to the same prompts."""
        if not metrics.get("samples"):
            return []
        rows = [[s["prompt"], s["reference"], s["output"]] for s in metrics["samples"]]
        return [
            ReportTable(
                f"Sample generations: {split}", ["prompt", "reference model", "adapter"], rows, "samples"
            )
        ]

    def __init__(self) -> None:
        self.train_cfg: PreferenceTrainConfig | None = (
            None  # set by prepare / apply_adapter: the losses' settings
        )

    # ---- data -----------------------------------------------------------------------------------
    def columns(self, data_cfg: DataConfig) -> list[str]:
        return [data_cfg.chosen_column, data_cfg.rejected_column]

    def prepare(self, cfg: RunConfig, processor: Any) -> PreparedData:
        self.train_cfg = cfg.train
        d = cfg.data
        raw = build_splits(d, columns=self.columns(d))
        splits, counts = {}, {}
        for name, ds in raw.items():
            splits[name], counts[name] = self._encode_split(ds, processor, d, key=f"data.{name}")
        warnings = [
            f"data.{split}: {c['skipped_identical']} pair(s) with chosen == rejected and "
            f"{c['skipped_empty']} with an empty answer skipped; "
            f"{c['prompt_cut']} lost the start of their prompt, {c['answer_cut']} the end of an "
            f"answer, {c['dropped']} dropped (an answer beyond data.max_length={d.max_length})"
            for split, c in counts.items()
            if any(c.values())
        ]
        lengths = np.asarray(column_values(splits["train"], "length"))
        stats = {
            "sizes": {k: len(v) for k, v in raw.items()},
            "columns": raw["train"].column_names,
            "pairs": counts,
            "warnings": warnings,
            "train_tokens": {"mean": float(lengths.mean()), "max": int(lengths.max())},
        }
        return PreparedData(DatasetDict(splits), processor, None, stats)

    def _encode_split(
        self, ds: Dataset, processor: Any, data_cfg: DataConfig, *, key: str
    ) -> tuple[Dataset, dict[str, int]]:
        """Model-ready pairs of one split and how many rows were skipped or truncated."""
        d = data_cfg
        self._with_template(processor, d)
        has_prompt = d.prompt_column in ds.column_names
        if not has_prompt and len(ds) and not isinstance(ds[0][d.chosen_column], list):
            raise DataError(
                f"{key}: no column '{d.prompt_column}' (columns: {', '.join(ds.column_names)}); "
                "add it, set data.prompt_column, or give chosen / rejected as whole conversations"
            )
        counts = {"skipped_identical": 0, "skipped_empty": 0, "prompt_cut": 0, "answer_cut": 0, "dropped": 0}
        rows = []
        for i, row in enumerate(ds):
            chosen, rejected = pair_messages(row, d, has_prompt=has_prompt, key=key, index=i)
            if (
                not chosen
                or not rejected
                or not chosen[-1]["content"].strip()
                or not rejected[-1]["content"].strip()
                or chosen[-1]["role"] != "assistant"
                or rejected[-1]["role"] != "assistant"
            ):
                counts["skipped_empty"] += 1
                continue
            if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
                counts["skipped_identical"] += 1
                continue
            ex = encode_pair(processor, chosen, rejected, d.max_length)
            if ex is None:
                counts["dropped"] += 1
                continue
            counts["prompt_cut"] += ex["cut"] == 1
            counts["answer_cut"] += ex["cut"] == 2
            rows.append(ex)
        if not rows:
            raise DataError(
                f"{key}: no usable pair among {len(ds)} rows "
                f"({', '.join(f'{k}: {v}' for k, v in counts.items() if v)}); check the chosen / "
                "rejected columns or raise data.max_length"
            )
        return Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0] if k != "cut"}), counts

    def preprocess(
        self, ds: Dataset, processor: Any, data_cfg: DataConfig, label_space: Any, *, key: str
    ) -> Dataset:
        return self._encode_split(ds, processor, data_cfg, key=key)[0]

    def collate(self, processor: Any, data_cfg: DataConfig, *, train: bool = False) -> Any:
        """Pairs -> one causal-LM batch of 2B rows: the chosen answers, then the rejected ones."""
        rows_to_batch = super().collate(processor, data_cfg, train=train)

        def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            rows = [
                {"input_ids": ex[f"{side}_input_ids"], "labels": ex[f"{side}_labels"]}
                for side in ("chosen", "rejected")
                for ex in examples
            ]
            return rows_to_batch(rows)

        return collate_fn

    # ---- model ----------------------------------------------------------------------------------
    starts_from = ("causal-lm", "preference")

    def starting_adapter(self, cfg: RunConfig) -> tuple[str, str] | None:
        ref = getattr(cfg.train, "reference_adapter", None)
        return ("train.reference_adapter", ref) if ref else None

    def apply_adapter(
        self, base: torch.nn.Module, cfg: RunConfig, new_modules: list[str], start: Path | None = None
    ) -> Any:
        """A new LoRA adapter, or (``train.reference_adapter``, checked by the build) the starting
        adapter loaded twice: trainable as ``default`` and frozen as ``reference``."""
        self.train_cfg = cfg.train
        if start is None:
            return super().apply_adapter(base, cfg, new_modules)
        from peft import PeftModel

        from lorakit.models import modeling

        folder = start
        log.info(
            "starting from adapter %s (its LoRA settings; lora: is not used); it is also the "
            "frozen reference",
            folder,
        )
        with modeling.mutated_base_warnings_off():
            model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
            model.load_adapter(str(folder), adapter_name=REFERENCE, is_trainable=False)
        model.set_adapter("default")
        return model

    # ---- training -------------------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Mean preference loss of the batch's pairs."""
        t = self.train_cfg or PreferenceTrainConfig()
        starts = shared_prompt_starts(model, batch)
        policy, tokens = pair_logps(model, batch, starts)
        reference = None
        if t.loss != "simpo":
            with torch.no_grad(), as_reference(model) as ref_model:
                reference, _ = pair_logps(ref_model, batch, starts)
        losses, _, _ = pair_losses(t.loss, t.beta, t.simpo_gamma, policy, reference, tokens.clamp(min=1))
        return losses.mean()

    def loss_units(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].shape[0] // 2)  # pairs

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
        """Loss, reward accuracy / margin, log-probabilities, KL from the reference, and samples.

        ``kl_chosen_tokens``: the exact KL(pi || pi_ref) over the vocabulary at each answer token of the
        chosen answers (teacher-forced), averaged per token. ``kl_sampled``: the sequence-level
        KL(pi || pi_ref) estimated as the mean of log pi(y|x) - log pi_ref(y|x) over one answer sampled
        from the policy (temperature 1, no top-k / top-p) for each of ``generation_samples`` prompts.
        """
        from lorakit.data.batching import autocast, eval_batches, take, to_device

        d, t = cfg.data, cfg.train
        n_gen = t.generation_samples
        was_training = model.training
        model.eval()
        collate = self.collate(processor, d)
        world = distributed.current()
        sums = dict.fromkeys(EVAL_SUMS, 0.0)
        for idx in distributed.shard(eval_batches(column_values(ds, "length"), batch_size), world):
            batch = to_device(collate(take(ds, idx)), device)
            for k, v in self._pair_sums(model, batch, len(idx), t, device, amp).items():
                sums[k] += v
            if progress is not None:
                progress.update(len(idx) * world.size)
        if progress is not None:
            progress.close()
        totals = dict(zip(EVAL_SUMS, distributed.all_sum([sums[k] for k in EVAL_SUMS], device), strict=True))
        n = max(1, len(ds))
        metrics: dict[str, Any] = {
            "loss": totals["loss"] / n,
            "reward_accuracy": totals["correct"] / n,
            "reward_margin": totals["margin"] / n,
            "rewards_chosen": totals["reward_c"] / n,
            "rewards_rejected": totals["reward_r"] / n,
            "logps_chosen": totals["logp_c"] / n,
            "logps_rejected": totals["logp_r"] / n,
            "kl_chosen_tokens": totals["kl_tok"] / max(1.0, totals["tokens"]),
            "pairs": len(ds),
        }
        if n_gen and "prompt_ids" in ds.column_names:
            with autocast(device, amp):  # sampled in the run's precision, as the losses
                metrics |= self._generations(
                    model,
                    processor,
                    ds["prompt_ids"][:n_gen],
                    max_new_tokens=t.max_new_tokens,
                    batch_size=batch_size,
                    seed=t.seed,
                )
        model.train(was_training)
        return metrics

    def _pair_sums(
        self,
        model: torch.nn.Module,
        batch: dict[str, Any],
        b: int,
        t: PreferenceTrainConfig,
        device: torch.device,
        amp: torch.dtype | None,
    ) -> dict[str, float]:
        """The :data:`EVAL_SUMS` of one batch of ``b`` pairs (its rows: ``b`` chosen, then ``b`` rejected)."""
        from lorakit.data.batching import autocast

        with autocast(device, amp):
            starts = shared_prompt_starts(model, batch)
            pol_logits, targets, rows = pair_logits(model, batch, starts)
            with as_reference(model) as ref_model:
                ref_logits, _, _ = pair_logits(ref_model, batch, starts)
        (policy, tokens), (reference, _) = (
            row_logps(x, targets, rows, 2 * b) for x in (pol_logits, ref_logits)
        )
        losses, rc, rr = pair_losses(t.loss, t.beta, t.simpo_gamma, policy, reference, tokens.clamp(min=1))
        # KL over the vocabulary at the chosen answers' tokens only ([tokens, V]; rows < b are chosen)
        chosen = rows < b
        pol_lp, ref_lp = (x[chosen].float().log_softmax(-1) for x in (pol_logits, ref_logits))
        kl = (pol_lp.exp() * (pol_lp - ref_lp)).sum(-1)
        return {
            "loss": float(losses.sum()),
            "correct": float((rc > rr).sum()),
            "margin": float((rc - rr).sum()),
            "reward_c": float(rc.sum()),
            "reward_r": float(rr.sum()),
            "logp_c": float(policy[:b].sum()),
            "logp_r": float(policy[b:].sum()),
            "kl_tok": float(kl.sum()),
            "tokens": float(chosen.sum()),
        }

    def _generations(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        batch_size: int,
        seed: int,
    ) -> dict[str, Any]:
        """Sampled KL from the reference on ``prompts``, and greedy samples of policy and reference."""
        kl = [
            float(x)
            for x in self.sampled_log_ratios(
                model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed
            )
        ]
        shown = prompts[:8]
        after = self.generate_ids(
            model, tokenizer, shown, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        with as_reference(model) as ref_model:
            before = self.generate_ids(
                ref_model, tokenizer, shown, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
        samples = [
            {"prompt": tokenizer.decode(p, skip_special_tokens=False)[-500:], "reference": r, "output": o}
            for p, r, o in zip(shown, before, after, strict=True)
        ]
        return {"kl_sampled": float(np.mean(kl)), "samples": samples}

    @torch.no_grad()
    def sampled_log_ratios(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        batch_size: int,
        seed: int,
    ) -> list[float]:
        """log pi(y|x) - log pi_ref(y|x) for one answer y sampled from the policy per prompt (its mean
        estimates KL(pi || pi_ref) of whole answers). Answers end at the end-of-turn token, included."""
        from lorakit.tasks.causal_lm import end_of_turn_ids

        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        stops = end_of_turn_ids(tokenizer, model.get_base_model())
        out: list[float] = []
        # The same samples at every evaluation of a run; the run's own random state is left as it was.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attn = torch.zeros_like(ids)
                for i, p in enumerate(chunk):  # left padding for generation
                    ids[i, width - len(p) :], attn[i, width - len(p) :] = torch.tensor(p), 1
                gen = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=attn.to(device),
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stops,
                    pad_token_id=pad,
                )[:, width:].tolist()
                rows = []
                for p, answer in zip(chunk, gen, strict=True):
                    end = next((j + 1 for j, tok in enumerate(answer) if tok in stops), len(answer))
                    rows.append({"input_ids": p + answer[:end], "labels": [IGNORE] * len(p) + answer[:end]})
                batch = {k: v.to(device) for k, v in CausalLM.collate(self, tokenizer, _PLAIN)(rows).items()}
                policy, _ = answer_logps(model, batch)
                with as_reference(model) as ref_model:
                    reference, _ = answer_logps(ref_model, batch)
                out.extend((policy - reference).tolist())
        return out


_PLAIN = PreferenceDataConfig(train="-", pad_to_multiple_of=None)  # collation settings of the KL batches
