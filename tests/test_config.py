"""Config loading: every problem reported at once, overrides, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorakit.config.loading import apply_overrides, load_config, validate_config
from lorakit.config.schema import RunConfig
from lorakit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"data": {"train": "x.csv"}, "model": {"name_or_path": "some/model"}}


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL))
    assert cfg.task == "text-classification"
    # the defaults BENCHMARKS.md's quality table justifies
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.train.learning_rate, cfg.model.dropout) == (
        8,
        16,
        0.0,
        None,
        0.0,
    )
    # the learning rate is the architecture's, resolved before any model is built (and saved so)
    import torch

    from lorakit.adapters.build import resolve_config
    from lorakit.models import modeling
    from lorakit.tasks import get_task

    def resolved_lr(c, model: str) -> float:
        c = c.model_copy(update={"model": c.model.model_copy(update={"name_or_path": model})})
        return resolve_config(c, get_task(c.task), torch.device("cpu")).train.learning_rate

    assert resolved_lr(cfg, "some/bert") == 1e-3
    assert (
        resolved_lr(cfg, "zoo:efficientnet-lite0")
        == modeling.default_learning_rate("zoo:efficientnet-lite0")
        > 1e-3
    )
    assert cfg.train.learning_rate is None  # the config given is not changed
    assert (
        resolved_lr(
            load_config(_write(tmp_path, MINIMAL), ["train.learning_rate=2e-4"]), "zoo:efficientnet-lite0"
        )
        == 2e-4
    )
    assert cfg.train.batch_size == 16 and cfg.data.max_length == 256 and cfg.data.truncation is None
    for section in (cfg.data, cfg.model, cfg.lora, cfg.train, cfg.output):
        for name, field in type(section).model_fields.items():
            assert field.description, f"{type(section).__name__}.{name} has no description"


def test_three_mistakes_are_reported_together(tmp_path: Path) -> None:
    bad = {**MINIMAL, "lora": {"r": 0}, "train": {"learning_rat": 1e-3, "epochs": "many"}}
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, bad))
    problems = exc.value.problems
    assert len(problems) == 3, problems
    text = str(exc.value)
    assert "3 problems" in text and "\n" not in text
    assert "lora.r = 0" in text and "greater than or equal to 1" in text
    assert "train.learning_rat: unknown key; did you mean 'learning_rate'?" in text
    assert "train.epochs = 'many'" in text


def test_missing_required_sections_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, {"lora": {"r": 8}}))
    assert {"data: required but missing", "model: required but missing"} <= set(exc.value.problems)


def test_unknown_section_suggests_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trian: unknown key; did you mean 'train'"):
        load_config(_write(tmp_path, {**MINIMAL, "trian": {}}))


def test_cross_field_rule_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.validation_size: 2.5 is neither a share"):
        load_config(_write(tmp_path, {**MINIMAL, "data": {"train": "x.csv", "validation_size": 2.5}}))


def test_overrides_are_parsed_as_yaml(tmp_path: Path) -> None:
    cfg = load_config(
        _write(tmp_path, MINIMAL),
        ["train.epochs=2", "lora.target_modules=[query, value]", "data.where={source: imdb}"],
    )
    assert cfg.train.epochs == 2
    assert cfg.lora.target_modules == ["query", "value"]
    assert cfg.data.where == {"source": "imdb"}


def test_no_stays_a_word_in_files_and_overrides(tmp_path: Path) -> None:
    # YAML 1.1 reads a bare `no` as False; lorakit reads configs with the 1.2 booleans (true / false only)
    p = tmp_path / "c.yaml"
    p.write_text("data: {train: x.csv}\nmodel: {name_or_path: some/model}\ntrain:\n  mixed_precision: no\n")
    assert load_config(p).train.mixed_precision == "no"
    cfg = load_config(
        _write(tmp_path, MINIMAL),
        [
            "task=image-classification",
            "train.mixed_precision=no",
            "data.augment.hflip=false",
            "train.score_base_model=yes",
        ],
    )
    assert (cfg.train.mixed_precision, cfg.data.augment.hflip, cfg.train.score_base_model) == (
        "no",
        False,
        True,
    )  # yes / no still set a switch


def test_override_creates_missing_section_and_unknown_key_is_reported(tmp_path: Path) -> None:
    raw = apply_overrides(MINIMAL, ["output.dir=/tmp/x"])
    assert raw["output"] == {"dir": "/tmp/x"} and "output" not in MINIMAL
    with pytest.raises(ConfigError, match="train.lr: unknown key"):
        load_config(_write(tmp_path, MINIMAL), ["train.lr=0.1"])


def test_a_task_owns_its_fields_and_the_error_names_the_owner(tmp_path: Path) -> None:
    # each task validates its own data / train fields; a field of another task is named as such
    with pytest.raises(ConfigError) as err:
        load_config(
            _write(tmp_path, MINIMAL),
            ["data.image_size=64", "train.generation_samples=8", "data.max_lenght=3"],
        )
    assert err.value.problems == [
        "data.image_size: unknown key; it belongs to task image-classification, not text-classification",
        "data.max_lenght: unknown key; did you mean 'max_length'?",
        "train.generation_samples: unknown key; it belongs to task causal-lm / preference / grpo, not "
        "text-classification",
    ]
    lm = load_config(_write(tmp_path, MINIMAL), ["task=causal-lm", "train.generation_samples=8"])
    assert (type(lm.data).__name__, lm.train.generation_samples) == ("CausalLMData", 8)
    with pytest.raises(
        ConfigError, match=r"task = 'nope': input should be 'text-classification', .*lora.r = 0"
    ):
        load_config(_write(tmp_path, MINIMAL), ["task=nope", "lora.r=0"])


@pytest.mark.parametrize("item", ["epochs", "=3", "train..x=1"])
def test_malformed_override(item: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(_write(tmp_path, MINIMAL), [item])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        validate_config([1, 2])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_the_original_vit_brief_is_expressible() -> None:
    cfg = load_config(ROOT / "configs" / "vit-food101-brief.yaml")
    t = cfg.train
    assert (
        cfg.task == "image-classification" and cfg.model.name_or_path == "google/vit-base-patch16-224-in21k"
    )
    assert (t.learning_rate, t.batch_size, t.gradient_accumulation_steps, t.epochs, t.mixed_precision) == (
        5e-3,
        128,
        4,
        5,
        "fp16",
    )
    assert cfg.lora.target_modules is None and cfg.data.augment.hflip


def test_augment_ranges_are_checked(tmp_path: Path) -> None:
    raw = MINIMAL | {
        "task": "image-classification",
        "data": {"train": "x", "augment": {"crop_scale": [0.9, 0.2]}},
    }
    with pytest.raises(
        ConfigError, match=r"data.augment.crop_scale: \[0.9, 0.2\] must satisfy 0 < min <= max <= 1"
    ):
        validate_config(raw)
