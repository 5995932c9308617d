"""Which of two runs is better, and how sure that is: a paired comparison on the same test examples.

Every test evaluation saves each example's outcome (``metrics.json``: ``test.predictions``, in
split order: the true and predicted label of a classifier, the exact match of a language model's
answer, the reward of a GRPO adapter's greedy answer). When two runs were scored on the same examples
(the same data, split seed and test size, so the same true labels in the same order), their outcomes
are paired, example by example:

- accuracy and exact match (right / wrong per example): McNemar's exact test, i.e. a two-sided
  binomial test (``scipy.stats.binomtest``) on the examples only one of the runs got right;
- every metric, accuracy and mean reward included: a 95% paired bootstrap confidence interval of
  the difference B - A (``scipy.stats.bootstrap`` with ``paired=True``, resampling examples).

The same comparison runs against the base model where a run scored it (``train.score_base_model``:
``test_base_model.predictions``). Runs scored on different examples are not paired: the result
says why.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.errors import LorakitError

CONFIDENCE = 0.95
RESAMPLES = 2000
#: The data keys that decide which examples land in the test split.
SPLIT_KEYS = ("train", "test", "test_size", "seed", "where", "max_eval_samples", "format", "hub_split")


@dataclass
class MetricDiff:
    """One metric of A and B on the same examples."""

    metric: str
    a: float
    b: float
    low: float  # the CI of b - a
    high: float
    p_value: float | None = None  # McNemar's exact test (binary outcomes only)
    a_only: int | None = None  # examples only A got right / only B got right
    b_only: int | None = None
    unit: str = "points"  # how a difference is shown: percentage points of a share, or the metric's own units

    def fmt(self, x: float) -> str:
        """A difference (or an interval end) as shown: ``+8.7`` points of a share, ``+0.214`` of a reward."""
        return f"{100 * x:+.1f}" if self.unit == "points" else f"{x:+.3f}"

    @property
    def diff(self) -> float:
        return self.b - self.a

    @property
    def sure(self) -> bool:
        """The difference is clear: the test rejects it at 5%, or the interval excludes zero."""
        return self.p_value < 0.05 if self.p_value is not None else not (self.low <= 0 <= self.high)


@dataclass
class Comparison:
    """A paired comparison of run ``a`` and run ``b`` (names as given)."""

    a: str
    b: str
    examples: int = 0
    paired: bool = False
    reason: str = ""  # why the runs could not be paired
    note: str = ""  # paired, but worth knowing (the data configs differ)
    metrics: list[MetricDiff] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """One line: which is better, by how much, and how sure (on the headline metric, the first)."""
        if not self.paired:
            return f"not compared example by example: {self.reason}"
        m = self.metrics[0]
        sign = 1 if m.diff >= 0 else -1  # told from the better run's side: "+8.7 points"
        low, high = sorted((sign * m.low, sign * m.high))
        unit = f" {m.unit}" if m.unit == "points" else ""
        detail = f"{m.fmt(sign * m.diff)}{unit}, {CONFIDENCE:.0%} CI {m.fmt(low)} to {m.fmt(high)}" + (
            f", McNemar p = {m.p_value:.2g}" if m.p_value is not None else ""
        )
        if not m.sure:
            where = f"{self.b} - {self.a}: {detail}"
            return f"no clear difference in {m.metric} ({where}) on {self.examples} examples"
        better, worse = (self.b, self.a) if sign > 0 else (self.a, self.b)
        return f"{better} is better than {worse}: {detail} in {m.metric} on {self.examples} examples"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self) | {"verdict": self.verdict}
        for m, d in zip(self.metrics, out["metrics"], strict=True):
            d |= {"diff": m.diff, "sure": m.sure}
        return out


def _bootstrap(data: tuple[np.ndarray, ...], statistic: Any, vectorized: bool) -> tuple[float, float]:
    from scipy.stats import bootstrap

    point = float(statistic(*data))
    if len(data[0]) < 2 or np.array_equal(data[-2], data[-1]):
        return point, point  # the same outcomes on every example: the difference is exactly the point
    with warnings.catch_warnings():  # resamples that all agree make scipy warn; the interval is the point
        warnings.simplefilter("ignore")
        res = bootstrap(
            data,
            statistic,
            paired=True,
            vectorized=vectorized,
            n_resamples=RESAMPLES,
            confidence_level=CONFIDENCE,
            method="percentile",
            rng=np.random.default_rng(0),
        )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return (point, point) if np.isnan(low) or np.isnan(high) else (low, high)


def binary_diff(metric: str, right_a: np.ndarray, right_b: np.ndarray) -> MetricDiff:
    """Paired right/wrong outcomes: McNemar's exact test and a bootstrap CI of the difference in share."""
    from scipy.stats import binomtest

    a_only = int(np.sum(right_a & ~right_b))
    b_only = int(np.sum(right_b & ~right_a))
    p = binomtest(b_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    low, high = _bootstrap(
        (right_a.astype(float), right_b.astype(float)),
        lambda x, y, axis=-1: np.mean(y, axis=axis) - np.mean(x, axis=axis),
        vectorized=True,
    )
    return MetricDiff(
        metric, float(right_a.mean()), float(right_b.mean()), low, high, float(p), a_only, b_only
    )


def reward_diff(reward_a: np.ndarray, reward_b: np.ndarray) -> MetricDiff:
    """Paired per-example rewards (GRPO): a bootstrap CI of the difference in the mean reward."""
    low, high = _bootstrap(
        (reward_a, reward_b),
        lambda x, y, axis=-1: np.mean(y, axis=axis) - np.mean(x, axis=axis),
        vectorized=True,
    )
    return MetricDiff("reward", float(reward_a.mean()), float(reward_b.mean()), low, high, unit="")


def _macro_f1(true: np.ndarray, pred: np.ndarray, axis: int = -1) -> np.ndarray:
    """Macro F1 over the classes of integer-coded labels, along ``axis`` (resamples stacked before it)."""
    classes = np.arange(int(max(true.max(), pred.max())) + 1)
    t = np.expand_dims(true, -1) == classes  # (..., n, classes)
    p = np.expand_dims(pred, -1) == classes
    tp = np.sum(t & p, axis=axis - 1 if axis < 0 else axis)
    denom = np.sum(t, axis=axis - 1 if axis < 0 else axis) + np.sum(p, axis=axis - 1 if axis < 0 else axis)
    present = denom > 0  # a class neither true nor predicted in a resample does not count
    f1 = np.where(present, 2 * tp / np.maximum(denom, 1), 0.0)
    return f1.sum(-1) / np.maximum(present.sum(-1), 1)


def f1_diff(true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> MetricDiff:
    """Macro F1 of A and B with a paired bootstrap CI of the difference."""
    _, codes = np.unique(np.concatenate([true, pred_a, pred_b]), return_inverse=True)
    t, a, b = np.split(codes, 3)
    low, high = _bootstrap(
        (t, a, b),
        lambda t, a, b, axis=-1: _macro_f1(t, b, axis) - _macro_f1(t, a, axis),
        vectorized=True,
    )
    return MetricDiff("f1_macro", float(_macro_f1(t, a)), float(_macro_f1(t, b)), low, high)


def compare_predictions(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str]) -> Comparison:
    """Pair two evaluations' ``predictions`` (see the module docstring).

    Args:
        a, b: ``{"true": [...], "predicted": [...]}`` (classification) or ``{"reference": [...],
            "exact_match": [...]}`` (answers), in split order.
        names: What to call them in the verdict.
    """
    out = Comparison(*names)
    if "predicted" in a and "predicted" in b:
        key, kind = "true", "labels"
    elif "exact_match" in a and "exact_match" in b:
        key, kind = "reference", "references"
    elif "reward" in a and "reward" in b:
        key, kind = "prompt", "prompts"
    else:
        out.reason = "the two evaluations saved no per-example predictions of one kind (older runs?)"
        return out
    if a[key] != b[key]:
        out.reason = (
            f"they were scored on different examples ({len(a[key])} vs {len(b[key])}, or other {kind}); "
            "use the same data, data.seed and data.test_size"
        )
        return out
    out.paired = True
    if kind == "labels":
        true, pa, pb = np.asarray(a["true"]), np.asarray(a["predicted"]), np.asarray(b["predicted"])
        out.examples = len(true)
        out.metrics = [binary_diff("accuracy", pa == true, pb == true), f1_diff(true, pa, pb)]
    elif kind == "prompts":
        out.examples = len(a["reward"])
        out.metrics = [reward_diff(np.asarray(a["reward"], float), np.asarray(b["reward"], float))]
    else:
        keep = [
            i for i, v in enumerate(a["exact_match"]) if v is not None and b["exact_match"][i] is not None
        ]
        out.examples = len(keep)
        ra = np.asarray([a["exact_match"][i] for i in keep]) > 0.5
        rb = np.asarray([b["exact_match"][i] for i in keep]) > 0.5
        out.metrics = [binary_diff("exact_match", ra, rb)]
    return out


def _run_files(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics.json, config's data section) of a finished run folder."""
    try:
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise LorakitError(f"'{run}' has no readable metrics.json; compare finished runs") from None
    data: dict[str, Any] = {}
    try:
        import yaml

        data = (yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}).get("data") or {}
    except (OSError, ValueError, AttributeError):
        pass
    return metrics, data


def compare_runs(run_a: Path, run_b: Path | None = None) -> list[Comparison]:
    """Paired comparisons of two finished run folders: B against A, and each against its base model
    where it scored one. With ``run_b`` None: ``run_a`` against its base model only.

    Raises:
        LorakitError: A folder is not a finished run.
    """
    ma, da = _run_files(run_a)
    runs = [(run_a.name, ma, da)]
    if run_b is not None:
        mb, db = _run_files(run_b)
        runs.append((run_b.name, mb, db))
    out = []
    if run_b is not None:
        pa, pb = ((m.get("test") or {}).get("predictions") for _, m, _ in runs)
        if pa is None or pb is None:
            c = Comparison(
                run_a.name, run_b.name, reason="a run has no test split with per-example predictions"
            )
        else:
            c = compare_predictions(pa, pb, (run_a.name, run_b.name))
            changed = [k for k in SPLIT_KEYS if da.get(k) != db.get(k)]
            if c.paired and changed:
                c.note = f"data.{', data.'.join(changed)} differ, yet the test labels match"
        out.append(c)
    for name, metrics, _ in runs:
        base = (metrics.get("test_base_model") or {}).get("predictions")
        mine = (metrics.get("test") or {}).get("predictions")
        if base is not None and mine is not None:
            out.append(compare_predictions(base, mine, (f"{name}'s base model", name)))
    return out


def format_table(comparisons: list[Comparison]) -> str:
    """The comparisons as the command line prints them."""
    lines = []
    for c in comparisons:
        lines.append(f"{c.a}  vs  {c.b}")
        for m in c.metrics:
            test = (
                f"  McNemar p = {m.p_value:.2g} ({m.a_only} vs {m.b_only} discordant)"
                if m.p_value is not None
                else ""
            )
            lines.append(
                f"  {m.metric:<12} {m.a:.4f} -> {m.b:.4f}  {m.fmt(m.diff)}"
                f"{' points' if m.unit == 'points' else ''}  {CONFIDENCE:.0%} CI {m.fmt(m.low)} to "
                f"{m.fmt(m.high)}{test}"
            )
        lines.append(f"  {c.verdict}")
        if c.note:
            lines.append(f"  note: {c.note}")
    return "\n".join(lines)
