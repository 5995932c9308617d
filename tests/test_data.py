"""Reading, filtering, splitting and label handling."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_texts, write_csv
from lorakit.config.schema import DataConfig
from lorakit.data.labels import LabelSpace
from lorakit.data.sources import build_splits, read_source
from lorakit.errors import DataError


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "parquet", "tsv"])
def test_reads_every_file_format(fmt: str, tmp_path: Path) -> None:
    rows = make_texts(10)
    df = pd.DataFrame(rows, columns=["text", "label"])
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == "json":
        path.write_text(json.dumps(df.to_dict(orient="records")))
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    ds = read_source(str(path))
    assert len(ds) == 10 and ds[0]["text"] == rows[0][0]


def test_missing_empty_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.train: file '.*nope.csv' does not exist"):
        read_source(str(tmp_path / "nope.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="is empty"):
        read_source(str(tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="holds no rows"):
        read_source(str(tmp_path / "header.csv"))
    (tmp_path / "d.xyz").write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        read_source(str(tmp_path / "d.xyz"))


def test_hub_name_offline_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read the variables at import: without these the test waits for network timeouts.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"data.train: could not load Hub dataset|Hub cannot be reached"):
        read_source("someone/imaginary-dataset-xyz")


def _cfg(train: Path, **kw) -> DataConfig:
    return DataConfig(train=str(train), **kw)


def test_missing_column_lists_the_real_ones(tmp_path: Path) -> None:
    from lorakit.config.loading import validate_config
    from lorakit.tasks import get_task

    path = write_csv(tmp_path / "d.csv", [("a b", "x"), ("c d", "y")], header=("review", "label"))
    cfg = validate_config({"data": {"train": str(path)}, "model": {"name_or_path": "m"}})
    with pytest.raises(DataError, match=r"column 'text' not found; the data has review, label"):
        get_task("text-classification").prepare(cfg, processor=None)


def test_seeded_splits_are_reproducible_and_stratified(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", make_texts(100))

    def encode(ds, key):
        from datasets import ClassLabel

        ds = ds.map(lambda b: {"labels": [0 if v == "neg" else 1 for v in b["label"]]}, batched=True)
        return ds.cast_column("labels", ClassLabel(names=["neg", "pos"]))

    cfg = _cfg(path, validation_size=0.2, test_size=10, seed=3)
    a = build_splits(cfg, columns=["text", "label"], encode=encode, stratify="labels")
    b = build_splits(cfg, columns=["text", "label"], encode=encode, stratify="labels")
    assert {k: len(v) for k, v in a.items()} == {"train": 72, "validation": 18, "test": 10}
    assert a["validation"]["text"] == b["validation"]["text"]
    assert sum(a["test"]["labels"]) == 5  # stratified: half of each class
    # the three splits partition the rows: every row lands in exactly one of them (as a multiset, since
    # two generated reviews may read the same)
    parts = [text for split in ("train", "validation", "test") for text in a[split]["text"]]
    assert sorted(parts) == sorted(text for text, _ in make_texts(100))
    c = build_splits(
        _cfg(path, validation_size=0.2, test_size=10, seed=4),
        columns=["text", "label"],
        encode=encode,
        stratify="labels",
    )
    assert c["validation"]["text"] != a["validation"]["text"]


def test_where_filter_and_no_match(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "d.csv",
        [(t, lab, "a" if i % 3 else "b") for i, (t, lab) in enumerate(make_texts(30))],
        header=("text", "label", "source"),
    )
    splits = build_splits(_cfg(path, where={"source": "b"}, validation_size=2), columns=["text", "label"])
    assert len(splits["train"]) + len(splits["validation"]) == 10
    with pytest.raises(
        DataError, match=r"no rows match data.where .* values present: \{'source': \['a', 'b'\]\}"
    ):
        build_splits(_cfg(path, where={"source": "c"}), columns=["text", "label"])


def test_split_larger_than_data(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", make_texts(10))
    with pytest.raises(DataError, match="data.validation_size: asks for 20 held-out rows but only 10"):
        build_splits(_cfg(path, validation_size=20), columns=["text", "label"])


def test_label_space_from_strings_ints_and_names() -> None:
    assert LabelSpace.infer(["pos", "neg", "pos"]).labels == ("neg", "pos")
    assert LabelSpace.infer([1, 0, 2]).labels == ("0", "1", "2")
    space = LabelSpace.infer([1, 0], names=["negative", "positive"])
    assert (
        space.id2label == {0: "negative", 1: "positive"}
        and space.encode(1) == 1
        and space.encode("negative") == 0
    )
    assert LabelSpace.from_dict(space.to_dict()) == space
    assert space.unknown([0, 1, "neutral", 5]) == ["5", "neutral"]


@pytest.mark.parametrize(
    ("values", "names", "message"),
    [
        (["a", "a"], None, "single class"),
        (["a", None], None, "no label"),
        ([0, 3], ["x", "y"], "has 2 names but labels go up to 3"),
        (["a", "b"], ["a"], r"does not include \['b'\]"),
        ([-1, 0], None, "must be 0..K-1"),
    ],
)
def test_label_space_errors(values, names, message) -> None:
    with pytest.raises(DataError, match=message):
        LabelSpace.infer(values, names)
