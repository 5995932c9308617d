"""Config help texts are help: every field says what it does, and none carries a benchmark diary.

The descriptions are what `lorakit check`, the CLI's errors, the UI's new-run form and the generated
configuration reference show. Measurements (memory figures, dated runs, commits, bench files) belong in
BENCHMARKS.md, where they can be kept current.
"""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel

from lorakit.config import schema
from lorakit.tasks import task_class, task_names

FORBIDDEN = {
    "a benchmark file": re.compile(r"\bbench/|BENCHMARKS|\bbenchmark", re.IGNORECASE),
    "a memory figure": re.compile(r"\d\s*(?:[KMGT]i?B)\b"),
    "a date": re.compile(r"\b20\d\d-\d\d(?:-\d\d)?\b"),
    "a commit": re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b"),
    "a measured speed-up": re.compile(r"\b\d+(?:\.\d+)?x (?:the|faster|slower)\b"),
}


def _config_models() -> list[type[BaseModel]]:
    from lorakit.data.images import AugmentConfig
    from lorakit.experiments.tuning import SearchDim, TuneConfig

    models = [
        schema.DataConfig,
        schema.TokenizedDataConfig,
        schema.ModelConfig,
        schema.LoraSettings,
        schema.TrainConfig,
        schema.OutputConfig,
        schema.RunConfig,
        TuneConfig,
        SearchDim,
        AugmentConfig,
    ]
    for name in task_names():
        task = task_class(name)
        models += [task.data_config, task.train_config]
    return models


def _fields():
    for model in _config_models():
        for name, field in model.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                continue  # a section: its fields are checked on their own
            yield f"{model.__name__}.{name}", field.description or ""


FIELDS = dict(_fields())


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_no_description_cites_measurements(what):
    pattern = FORBIDDEN[what]
    bad = {key: pattern.search(text).group(0) for key, text in FIELDS.items() if pattern.search(text)}
    assert not bad, f"descriptions citing {what} (move it to BENCHMARKS.md / the docs): {bad}"


def test_every_field_is_described():
    assert len(FIELDS) > 80  # every section and task was read
    missing = [key for key, text in FIELDS.items() if len(text.split()) < 3]
    assert not missing, f"fields without a description: {missing}"


def test_the_patterns_catch_what_they_should():
    """The check is only as good as its patterns: each catches the kind of text it names."""
    samples = {
        "a benchmark file": "measured: bench/train_memory.py",
        "a memory figure": "peak RSS 1611 instead of 2322 MB",
        "a date": "as of 2026-12-01",
        "a commit": "since commit 8947efc",
        "a measured speed-up": "0.87x the step time",
    }
    for what, text in samples.items():
        assert FORBIDDEN[what].search(text), what
    assert not any(p.search("Tokens per example; lower it to train faster.") for p in FORBIDDEN.values())
