"""The paired comparison of two runs (`lorakit compare`, the compare page's verdict), without a browser."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import numpy as np
import pytest

from lorakit.evaluation.paired import compare_predictions, compare_runs


def outcomes(n: int, a_right: set[int], b_right: set[int]) -> tuple[dict, dict]:
    true = ["pos" if i % 2 else "neg" for i in range(n)]
    flip = {"pos": "neg", "neg": "pos"}
    a = [t if i in a_right else flip[t] for i, t in enumerate(true)]
    b = [t if i in b_right else flip[t] for i, t in enumerate(true)]
    return {"true": true, "predicted": a}, {"true": true, "predicted": b}


def test_mcnemar_exact_and_bootstrap_interval() -> None:
    # 100 examples: both right on 60, only B right on 12, only A right on 2, both wrong on 26
    both, b_only, a_only = set(range(60)), set(range(60, 72)), set(range(72, 74))
    a, b = outcomes(100, both | a_only, both | b_only)
    c = compare_predictions(a, b, ("A", "B"))
    acc = c.metrics[0]
    assert c.paired and c.examples == 100 and (acc.a, acc.b) == (0.62, 0.72)
    assert (acc.a_only, acc.b_only) == (2, 12)
    # exact McNemar: two-sided binomial tail of 2 successes in 14 at p = 1/2
    expected = 2 * sum(comb(14, k) for k in range(3)) / 2**14
    assert acc.p_value == pytest.approx(expected)
    assert acc.low < 0.10 < acc.high and acc.low > 0  # the CI holds the difference and excludes 0
    assert c.verdict.startswith("B is better than A: +10.0 points, 95% CI +")
    assert f"McNemar p = {expected:.2g}" in c.verdict
    f1 = c.metrics[1]
    assert f1.metric == "f1_macro" and f1.low <= f1.diff <= f1.high


def test_no_clear_difference_and_identical_runs() -> None:
    a, b = outcomes(40, set(range(0, 30)), set(range(1, 31)))  # one discordant example each way
    c = compare_predictions(a, b, ("A", "B"))
    assert c.metrics[0].p_value == 1.0 and c.verdict.startswith("no clear difference in accuracy")
    same = compare_predictions(a, a, ("A", "A2"))
    assert (same.metrics[0].low, same.metrics[0].high) == (0.0, 0.0)


def test_runs_on_other_examples_are_not_paired() -> None:
    a, _ = outcomes(40, set(range(30)), set())
    _, b = outcomes(41, set(), set(range(30)))
    c = compare_predictions(a, b, ("A", "B"))
    assert not c.paired and not c.metrics and "different examples" in c.verdict
    lm = compare_predictions({"reference": ["x"], "exact_match": [1.0]}, a, ("A", "B"))
    assert not lm.paired and "no per-example predictions" in lm.verdict


def test_exact_match_of_answers_is_paired() -> None:
    refs = [f"r{i}" for i in range(30)]
    a = {"reference": refs, "exact_match": [1.0] * 10 + [0.0] * 20}
    b = {"reference": refs, "exact_match": [1.0] * 25 + [0.0] * 4 + [None]}
    c = compare_predictions(a, b, ("A", "B"))
    assert c.examples == 29 and c.metrics[0].metric == "exact_match" and c.metrics[0].b_only == 15


def _run(folder: Path, test: dict, base: dict | None = None, seed: int = 42) -> Path:
    folder.mkdir()
    metrics = {"test": {"accuracy": float(np.mean(np.array(test["true"]) == np.array(test["predicted"])))}}
    metrics["test"]["predictions"] = test
    if base is not None:
        metrics["test_base_model"] = {"predictions": base}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.yaml").write_text(f"data:\n  train: x.csv\n  seed: {seed}\n")
    return folder


def cli(main, args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_compare_command_table_json_and_base_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorakit.cli import main

    a, b = outcomes(100, set(range(62)), set(range(74)))
    base, _ = outcomes(100, set(range(50)), set())
    run_a = _run(tmp_path / "a", a, base=base)
    run_b = _run(tmp_path / "b", b, seed=7)
    found = compare_runs(run_a, run_b)
    assert [(c.a, c.b) for c in found] == [("a", "b"), ("a's base model", "a")]
    assert found[0].note == "data.seed differ, yet the test labels match"
    assert cli(main, ["compare", str(run_a), str(run_b), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown[0]["metrics"][0]["b_only"] == 12 and shown[0]["verdict"].startswith("b is better than a")
    assert cli(main, ["compare", str(run_b)]) == 2  # no base model scored, no second run
    assert capsys.readouterr().err.startswith("error: ")
