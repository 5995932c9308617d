"""Property tests: whatever a user writes in a config or a --set, the loader answers with a valid
RunConfig or a ConfigError, never another exception."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.config.loading import load_config, validate_config
from lorakit.config.schema import RunConfig
from lorakit.errors import ConfigError

KEYS = [
    "task",
    "data",
    "model",
    "lora",
    "train",
    "output",
    "train",
    "r",
    "alpha",
    "epochs",
    "learning_rate",
    "name_or_path",
    "target_modules",
    "where",
    "max_length",
    "dir",
    "x",
    "",
    "validation_size",
    "truncation",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["all-linear", "head_tail", "1e-3", "text-classification"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)
    ),
    max_leaves=20,
)
configs = st.one_of(values, st.dictionaries(st.sampled_from(KEYS), values, max_size=7))


def _outcome(fn, *args) -> None:
    try:
        assert isinstance(fn(*args), RunConfig)
    except ConfigError as exc:
        assert exc.problems and "\n" not in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_any_data_validates_or_raises_config_error(raw) -> None:
    _outcome(validate_config, raw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=30), max_size=4))
def test_any_override_strings(tmp_path_factory, overrides) -> None:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "x.csv"}, "model": {"name_or_path": "m"}}))
    _outcome(load_config, path, overrides)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_any_file_bytes(tmp_path_factory, content) -> None:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "c.yaml"
    path.write_bytes(content)
    _outcome(load_config, path)
