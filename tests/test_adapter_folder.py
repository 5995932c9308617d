"""One owner of the adapter folder: every route that makes one (train, import of plain-peft files,
registry pull) writes ``lorakit.json`` that reads back the same way through ``folder.read_metadata``, and a
merged export's ``lorakit-export.json`` reads back through ``export.common.read_provenance``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import lorakit
from conftest import make_config, make_texts, write_csv
from lorakit.adapters.folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    METADATA_FILE,
    METADATA_FORMAT,
    build_metadata,
    lora_record,
    read_metadata,
    write_metadata,
)
from lorakit.errors import AdapterError

#: Every lorakit.json starts with these keys, in this order; then "trained" or "imported".
COMMON_KEYS = [
    "format",
    "task",
    "base_model",
    "label_space",
    "data",
    "lora",
    "parameters",
    "config",
    "versions",
    "created_at",
    "metrics",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """The adapter folder of a one-epoch run on the tiny BERT."""
    folder = tmp_path_factory.mktemp("adapter-folder-run")
    cfg = make_config(folder, tiny_bert_dir, write_csv(folder / "r.csv", make_texts(96)), train={"epochs": 1})
    return lorakit.train(cfg, progress=False).adapter_dir


def _plain_peft(adapter: Path, out: Path) -> Path:
    """The adapter's peft files alone, as plain peft would hand them over."""
    out.mkdir()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(adapter / name, out / name)
    return out


def test_train_and_import_of_the_same_peft_files_read_back_alike(trained: Path, tmp_path: Path) -> None:
    from lorakit.adapters.importing import import_adapter

    ours = read_metadata(trained)
    peft = _plain_peft(trained, tmp_path / "peft")
    import_adapter(peft, labels=["neg", "pos"])
    theirs = read_metadata(peft)

    assert list(ours) == [*COMMON_KEYS, "trained"] and list(theirs) == [*COMMON_KEYS, "imported"]
    assert ours["format"] == theirs["format"] == METADATA_FORMAT
    # The lora block and the parameter counts come from the peft config and model, whoever wrote them.
    assert theirs["lora"] == ours["lora"]
    assert list(ours["lora"]) == [
        "method",
        "r",
        "alpha",
        "dropout",
        "target_modules",
        "modules_to_save",
        "layers",
        "use_rslora",
        "use_dora",
        "effective_conv2d",
        "rank_pattern",
        "alpha_pattern",
    ]
    assert theirs["parameters"] == ours["parameters"] and ours["parameters"]["trainable"] > 0
    assert theirs["label_space"] == ours["label_space"]
    for key in ("resolved", "model_type", "fingerprint"):
        assert theirs["base_model"][key] == ours["base_model"][key], key
    assert list(theirs["base_model"]) == list(ours["base_model"])
    # Importing writes metadata beside the weights; it does not touch them.
    assert (peft / ADAPTER_WEIGHTS).read_bytes() == (trained / ADAPTER_WEIGHTS).read_bytes()


def test_a_pulled_version_reads_back_as_published(trained: Path, tmp_path: Path) -> None:
    from lorakit.adapters.registry import Registry

    reg = Registry(tmp_path / "reg")
    reg.publish(trained, "folder")
    dest = reg.pull("folder:1", to=tmp_path / "pulled")
    assert read_metadata(dest) == read_metadata(trained)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, METADATA_FILE):
        assert (dest / name).read_bytes() == (trained / name).read_bytes(), name


def test_a_merged_export_records_its_provenance(trained: Path, tmp_path: Path) -> None:
    from lorakit.export.common import EXPORT_FORMAT, read_provenance
    from lorakit.export.merge import export
    from lorakit.files.hashing import hash_tree

    export(trained, tmp_path / "merged")
    record = read_provenance(tmp_path / "merged")
    meta = read_metadata(trained)
    assert record["format"] == EXPORT_FORMAT and record["kind"] == "merged" and record["task"] == meta["task"]
    assert record["base_model"] == meta["base_model"] and record["label_space"] == meta["label_space"]
    assert record["adapters"] == {
        "run": {
            "path": str(trained.resolve()),
            "content_hash": hash_tree(trained)[0],
            "metrics": meta["metrics"],
        }
    }
    assert record["verification"]["merged_max_abs_diff"] <= 1e-4

    # A format 1 record (one "adapter", its metrics at the top) reads back in the same layout.
    old = {k: v for k, v in record.items() if k != "adapters"} | {
        "format": 1,
        "adapter": {"path": str(trained.resolve()), "content_hash": hash_tree(trained)[0]},
        "metrics": meta["metrics"],
    }
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "lorakit-export.json").write_text(json.dumps(old))
    assert read_provenance(tmp_path / "old")["adapters"] == record["adapters"]


def test_the_reader_takes_old_formats_and_refuses_unknown_ones(trained: Path, tmp_path: Path) -> None:
    copy = tmp_path / "adapter"
    shutil.copytree(trained, copy)
    meta_file = copy / METADATA_FILE
    meta = json.loads(meta_file.read_text())
    without = {k: v for k, v in meta.items() if k != "format"}
    for old in (without | {"format": "lorakit-adapter/1"}, without):  # version 1; written without "format"
        meta_file.write_text(json.dumps(old))
        assert read_metadata(copy) == old
    meta_file.write_text(json.dumps(meta | {"format": "lorakit-adapter/9"}))
    with pytest.raises(AdapterError, match="lorakit-adapter/9.*upgrade lorakit") as e:
        read_metadata(copy)
    assert "\n" not in str(e.value)
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "base_model"}))
    with pytest.raises(AdapterError, match="lacks base_model; the adapter's lorakit metadata is damaged"):
        read_metadata(copy)
    # Only what build_metadata makes is written.
    with pytest.raises(AdapterError, match="not written"):
        write_metadata(copy, {"task": "text-classification"})


def test_the_lora_block_is_peft_s_config_sorted() -> None:
    from peft import LoraConfig

    from lorakit.config.loading import validate_config

    lc = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["value", "query"],
        modules_to_save=["score", "classifier", "score"],
        layers_to_transform=1,
        rank_pattern={"query": 2},
        alpha_pattern={"query": 4},
    )
    block = lora_record(lc)
    assert block["target_modules"] == ["query", "value"] and block["modules_to_save"] == [
        "classifier",
        "score",
    ]
    assert (
        block["layers"] == [1]
        and block["rank_pattern"] == {"query": 2}
        and block["alpha_pattern"] == {"query": 4}
    )
    cfg = validate_config({"task": "causal-lm", "data": {"train": "x.jsonl"}, "model": {"name_or_path": "m"}})
    meta = build_metadata(
        cfg,
        lc,
        resolved="m",
        model_type="llama",
        fingerprint="sha256:0",
        label_space=None,
        data_sizes={},
        data_stats={},
        parameters=(1, 2),
        metrics={},
    )
    assert list(meta) == COMMON_KEYS and meta["lora"] == block
