"""Property tests of the server's request schemas: whatever a client sends to any route, the answer is
a 2xx or a JSON 4xx error, never a 5xx or an unhandled exception."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakit
from conftest import make_chat_rows, make_config, make_lm_config, make_texts, write_csv
from lorakit.serving import Engine, create_app

KEYS = [
    "adapter",
    "inputs",
    "top_k",
    "model",
    "messages",
    "role",
    "content",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "name",
    "max_completion_tokens",
    "x",
    "",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**9), 10**9),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(
        ["clf", "lm", "base", "../etc", "user", "assistant", "system", "clf:1", "great film", "data:,x"]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.sampled_from(KEYS), inner, max_size=6)
    ),
    max_leaves=25,
)
# Bodies shaped like the real schemas, with every field drawn from anything-goes values.
predict_bodies = st.fixed_dictionaries(
    {}, optional={"adapter": values, "inputs": values, "top_k": values, "x": values}
)
message = st.fixed_dictionaries({}, optional={"role": values, "content": values})
chat_bodies = st.fixed_dictionaries(
    {"model": st.one_of(st.just("lm"), values), "messages": st.one_of(st.lists(message, max_size=4), values)},
    optional={
        "max_tokens": st.one_of(st.integers(-5, 10_000), values),
        "temperature": values,
        "top_p": values,
        "n": values,
        "stream": values,
    },
)
ROUTES = [
    ("POST", "/v1/predict"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/adapters"),
    ("DELETE", "/v1/adapters/{}"),
]


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_llama_dir: Path):
    from fastapi.testclient import TestClient

    folder = tmp_path_factory.mktemp("fuzz-serve")
    clf = lorakit.train(
        make_config(folder, tiny_bert_dir, write_csv(folder / "r.csv", make_texts(96)), train={"epochs": 1}),
        progress=False,
    )
    (folder / "lm").mkdir()
    data = folder / "lm" / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_chat_rows(32)))
    lm = lorakit.train(
        make_lm_config(folder / "lm", tiny_llama_dir, data, train={"epochs": 1, "generation_samples": 0}),
        progress=False,
    )
    engines = [
        Engine([f"clf={clf.adapter_dir}"], window_ms=0, allow_base=True),
        Engine([f"lm={lm.adapter_dir}"], window_ms=0),
    ]
    yield [
        TestClient(create_app(e, admin_token="t", request_timeout=30), raise_server_exceptions=False)
        for e in engines
    ]
    for e in engines:
        e.close()


def _check(response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    route=st.sampled_from(ROUTES),
    body=st.one_of(values, predict_bodies, chat_bodies),
    which=st.integers(0, 1),
    auth=st.booleans(),
    name=st.text(max_size=20),
)
def test_any_json_body_on_any_route(clients, route, body, which, auth, name) -> None:
    method, path = route
    headers = {"Authorization": "Bearer t"} if auth else {}
    _check(clients[which].request(method, path.format(quote(name, safe="")), json=body, headers=headers))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=st.binary(max_size=200), route=st.sampled_from(ROUTES[:3]), which=st.integers(0, 1))
def test_any_bytes_on_any_route(clients, raw, route, which) -> None:
    _check(
        clients[which].request(
            route[0],
            route[1],
            content=raw,
            headers={"content-type": "application/json", "Authorization": "Bearer t"},
        )
    )


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=chat_bodies)
def test_chat_shaped_bodies(clients, body) -> None:
    _check(clients[1].post("/v1/chat/completions", json=body))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=predict_bodies)
def test_predict_shaped_bodies(clients, body) -> None:
    _check(clients[0].post("/v1/predict", json=body))
