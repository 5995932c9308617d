"""Fuzz the data files (issue 25, case 9): hypothesis writes csv / jsonl files with odd quoting, mixed
types, empty and huge cells, non-UTF-8 bytes and duplicate headers; `lorakit check` and `lorakit train`
(tiny model, one step) must end in a valid run or in one `error:` line, never a traceback.

The example counts are small on purpose (each example loads the model and may train a step): the
test is a net for whole classes of inputs, run on every `make test`, not an exhaustive search.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lorakit.cli import main

# ---- cells --------------------------------------------------------------------------------------

WORDS = ["great", "boring", "film", "the", "plot", "awful", "superb", "dull"]
text_cell = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
odd_cell = st.one_of(
    st.just(""),
    st.just(" "),
    st.text(alphabet="ab ,\"\n\r\t\\'", max_size=12),  # quotes, separators and line breaks inside a cell
    st.integers(-5, 5).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.just("x" * 50_000),  # a huge cell
    st.sampled_from(["pos", "neg", " pos", "POS", "null", "NaN", "true"]),
)
label_cell = st.one_of(st.sampled_from(["pos", "neg"]), odd_cell)
bad_bytes = st.sampled_from([b"\xff\xfe", b"caf\xe9", b"\x80", b"\x00"])


def _csv_cell(value: str, quote: bool) -> bytes:
    if quote or any(c in value for c in ',"\n\r'):
        return b'"' + value.replace('"', '""').encode() + b'"'
    return value.encode()


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    header = draw(
        st.sampled_from(
            [
                ["text", "label"],
                ["label", "text"],
                ["text", "label", "text"],
                ["text", "text"],
                ["text", "label", ""],
                ["text"],
            ]
        )
    )
    rows = []
    for i in range(draw(st.integers(0, 4)) if draw(st.integers(0, 5)) == 0 else draw(st.integers(8, 24))):
        cells = []
        for col in header:
            value = draw(
                text_cell
                if col == "text" and draw(st.booleans())
                else label_cell
                if col == "label"
                else odd_cell
            )
            cells.append(
                _csv_cell(
                    ["pos", "neg"][i % 2] if col == "label" and draw(st.booleans()) else value,
                    draw(st.booleans()),
                )
            )
        if draw(st.integers(0, 19)) == 0:
            cells = cells[: draw(st.integers(0, len(cells)))]  # a short row
        line = b",".join(cells)
        if draw(st.integers(0, 39)) == 0:
            line += draw(bad_bytes)  # not UTF-8
        rows.append(line)
    return b"\n".join([b",".join(h.encode() for h in header), *rows]) + draw(
        st.sampled_from([b"\n", b"", b"\r\n"])
    )


json_value = st.one_of(
    text_cell,
    label_cell,
    st.integers(-3, 3),
    st.floats(allow_nan=False),
    st.none(),
    st.booleans(),
    st.lists(st.integers(0, 2), max_size=2),
    st.dictionaries(st.just("k"), st.integers(0, 2), max_size=1),
)


@st.composite
def jsonl_files(draw: st.DrawFn) -> bytes:
    lines = []
    for i in range(draw(st.integers(0, 4)) if draw(st.integers(0, 5)) == 0 else draw(st.integers(8, 24))):
        text = draw(text_cell) if draw(st.integers(0, 3)) else draw(json_value)
        label = ["pos", "neg"][i % 2] if draw(st.integers(0, 2)) else draw(json_value)
        line = json.dumps({"text": text, "label": label}).encode()
        kind = draw(st.integers(0, 59))
        if kind == 0:
            line = line[: len(line) // 2]  # cut short
        elif kind == 1:
            line = line[:-1] + b', "label": "pos"}'  # a duplicate key
        elif kind == 2:
            line += draw(bad_bytes)
        lines.append(line)
    return b"\n".join(lines) + b"\n"


# ---- the property -------------------------------------------------------------------------------


def _run(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """A normal end or exit code 2 with one `error:` line; anything else (a traceback) fails."""
    capsys.readouterr()
    try:
        main(args)
    except SystemExit as exc:
        err = capsys.readouterr().err
        if exc.code not in (0, None):
            lines = err.strip().splitlines()
            assert exc.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
                f"exit {exc.code}: {err[-2000:]}"
            )
            return "error"
    return "trained"


def _check_and_train(content: bytes, suffix: str, model: Path, capsys: pytest.CaptureFixture) -> str:
    """`lorakit check` then `lorakit train` on one file; returns "trained" or "error" (the train's end)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"data{suffix}"
        data.write_bytes(content)
        cfg = {
            "task": "text-classification",
            "data": {"train": str(data), "validation_size": 0.25, "max_length": 16},
            "model": {"name_or_path": str(model)},
            "lora": {"r": 2, "alpha": 4},
            "train": {"max_steps": 1, "batch_size": 4, "seed": 1},
            "output": {"dir": str(Path(tmp) / "run"), "tensorboard": False, "report": False},
        }
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        _run(["check", str(config)], capsys)
        return _run(["train", str(config), "--no-progress"], capsys)


FUZZ = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


# Odd but usable files, so that the train path is always taken too: quoted separators and line breaks,
# a huge cell, labels with surrounding whitespace, an extra column of mixed types, a BOM.
ODD_CSV = (
    "\ufefftext,label,extra\n"
    + "".join(
        f'"{t}, ""quoted"",\nsecond line",{" pos" if lab == "pos" else "neg "},{i if i % 2 else "x"}\n'
        for i, (t, lab) in enumerate(zip(WORDS * 2, ["pos", "neg"] * 8, strict=True))
    )
    + f"{'great ' * 20000},pos,\n"
)
ODD_JSONL = "".join(
    json.dumps({"text": f"{w} 😀 \u00e9t\u00e9", "label": ["pos", "neg"][i % 2], "extra": None}) + "\n"
    for i, w in enumerate(WORDS * 2)
)


def _fuzz(files: st.SearchStrategy[bytes], odd: str, suffix: str, model: Path, capsys) -> Counter:
    """Every file drawn (and the odd but usable one) ends in a run or one error line; the count of each."""
    outcomes: Counter = Counter()

    @FUZZ
    @example(content=odd.encode())
    @given(content=files)
    def one_file(content: bytes) -> None:
        outcomes[_check_and_train(content, suffix, model, capsys)] += 1

    one_file()
    return outcomes


def test_fuzzed_csv_ends_in_a_run_or_one_error_line(
    tiny_bert_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    outcomes = _fuzz(csv_files(), ODD_CSV, ".csv", tiny_bert_dir, capsys)
    # the net reaches both ends: some files trained, some were refused
    assert outcomes["trained"] > 0 and outcomes["error"] > 0, outcomes


def test_fuzzed_jsonl_ends_in_a_run_or_one_error_line(
    tiny_bert_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    outcomes = _fuzz(jsonl_files(), ODD_JSONL, ".jsonl", tiny_bert_dir, capsys)
    assert outcomes["trained"] > 0 and outcomes["error"] > 0, outcomes
