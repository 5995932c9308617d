"""`lorakit serve`: every route and error on tiny models (TestClient), mixed-adapter batches equal to one
adapter at a time, LRU and merged fast path, a real uvicorn process over HTTP."""

from __future__ import annotations

import base64
import io
import itertools
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import (
    free_port,
    make_chat_rows,
    make_config,
    make_image_config,
    make_images,
    make_lm_config,
    make_texts,
    write_csv,
)
from lorakit.adapters.registry import Registry
from lorakit.serving import Engine, create_app
from lorakit.tasks.base import GenerateOptions

TEXTS = [
    "the film was wonderful and moving",
    "boring dull plot",
    "a clumsy story and the acting was weak really",
]


def _train(folder: Path, model_dir: Path, *, seed: int, labels: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = make_texts(96, seed=seed)
    if labels == 3:
        rows = [(t, lab if i % 3 else "meh") for i, (t, lab) in enumerate(rows)]
    run = lorakit.train(
        make_config(folder, model_dir, write_csv(folder / "r.csv", rows), train={"epochs": 2, "seed": seed}),
        progress=False,
    )
    return run.adapter_dir


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    out = {
        name: _train(root / name, tiny_bert_dir, seed=seed)
        for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3))
    }
    out["three"] = _train(root / "three", tiny_bert_dir, seed=4, labels=3)
    reg = Registry(root / "registry")
    reg.publish(out["gamma"], "gamma")
    reg.publish(out["three"], "three")
    out["registry"] = reg.root
    return out


@pytest.fixture(scope="module")
def engine(adapters):
    e = Engine(
        [f"alpha={adapters['alpha']}", f"beta={adapters['beta']}"],
        registry=adapters["registry"],
        window_ms=20,
        allow_base=True,
    )
    yield e
    e.close()


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    return TestClient(create_app(engine, admin_token="s3cret", max_body_bytes=20_000))


def _single(adapter_dir: Path, texts: list[str]) -> torch.Tensor:
    """Logits of one adapter on its own (plain lorakit loading, no server)."""
    from lorakit.adapters.build import load_adapter
    from lorakit.tasks.text_classification import encode_texts

    a = load_adapter(adapter_dir, device="cpu")
    enc = encode_texts(a.processor, texts, None, a.data_cfg)
    batch = a.task.collate(a.processor, a.data_cfg)(
        [{k: v[i] for k, v in enc.items()} for i in range(len(texts))]
    )
    with torch.no_grad():
        return a.model(**batch).logits


def _error(r, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return body["error"]["message"]


def test_predict_matches_each_adapter_alone(client, adapters) -> None:
    for name in ("alpha", "beta"):
        r = client.post("/v1/predict", json={"adapter": name, "inputs": TEXTS, "top_k": 2})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        want = torch.softmax(_single(adapters[name], TEXTS), -1)
        for p, w in zip(preds, want, strict=True):
            assert p["label"] in ("neg", "pos") and len(p["top_k"]) == 2
            assert abs(p["score"] - float(w.max())) < 1e-5


def test_mixed_adapter_batch_is_one_forward_with_each_rows_own_adapter(engine, adapters) -> None:
    before = engine.stats.batches
    jobs = [("alpha", TEXTS[:2]), ("beta", TEXTS), ("base", TEXTS[2:]), ("alpha", TEXTS[1:])]
    futures = [
        engine.submit(name, engine.encode(name, texts)) for name, texts in jobs
    ]  # within one 20 ms window
    results = [f.result(timeout=60) for f in futures]
    assert engine.stats.batches == before + 1  # all four requests, three adapters (base included), one pass
    for (name, texts), got in zip(jobs, results, strict=True):
        if name == "base":
            continue
        want = _single(adapters[name], texts)
        assert torch.allclose(torch.stack(got), want, atol=1e-5), name


def test_on_demand_registry_admin_routes_and_their_errors(client, engine) -> None:
    r = client.post(
        "/v1/predict", json={"adapter": "gamma", "inputs": TEXTS[:1]}
    )  # in the registry: loaded on demand
    assert r.status_code == 200, r.text
    names = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert names["gamma"]["loaded"] and names["gamma"]["source"] == "registry:gamma:1"

    assert "Bearer" in _error(client.post("/v1/adapters", json={"name": "gamma"}), 401)
    assert "Bearer" in _error(
        client.post("/v1/adapters", json={"name": "gamma"}, headers={"Authorization": "Bearer nope"}), 401
    )
    auth = {"Authorization": "Bearer s3cret"}
    assert "not valid" in _error(
        client.post("/v1/adapters", json={"name": "../../etc/passwd"}, headers=auth), 400
    )
    assert "not valid" in _error(
        client.post("/v1/adapters", json={"name": "/tmp/adapter"}, headers=auth), 400
    )
    assert "3 labels" in _error(client.post("/v1/adapters", json={"name": "three"}, headers=auth), 400)
    assert "not in the registry" in _error(
        client.post("/v1/adapters", json={"name": "nothing"}, headers=auth), 404
    )
    r = client.post("/v1/adapters", json={"name": "gamma:1"}, headers=auth)
    assert r.status_code == 201 and r.json()["name"] == "gamma"

    assert client.delete("/v1/adapters/gamma", headers=auth).json() == {"deleted": "gamma"}
    assert "gamma" not in {a["name"] for a in client.get("/v1/adapters").json()["adapters"]}
    _error(client.delete("/v1/adapters/gamma", headers=auth), 404)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"adapter": "nobody", "inputs": ["x"]}, 404, "not in the registry"),
        ({"adapter": "alpha", "inputs": []}, 422, "inputs"),
        ({"adapter": "alpha", "inputs": ["x"] * 300}, 422, "inputs"),
        ({"adapter": "alpha", "inputs": ["x"], "top_k": 0}, 422, "top_k"),
        ({"adapter": "alpha", "inputs": ["x"], "extra": 1}, 422, "extra"),
        ({"adapter": "alpha", "inputs": [""]}, 422, "non-empty text"),
        ({"adapter": "alpha", "inputs": [3]}, 422, "inputs"),
        ({"adapter": "", "inputs": ["x"]}, 422, "adapter"),
        ({"inputs": ["x"]}, 422, "adapter"),
        ({"adapter": "alpha", "inputs": ["x" * 30_000]}, 413, "over 20000 bytes"),
    ],
)
def test_bad_requests_get_json_4xx(client, body: dict, status: int, fragment: str) -> None:
    assert fragment in _error(client.post("/v1/predict", json=body), status)


def test_other_errors_metrics_and_schema(client) -> None:
    assert "JSON" in _error(
        client.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"}), 422
    )
    assert "/v1/predict" in _error(
        client.post(
            "/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
        ),
        404,
    )
    _error(client.get("/v1/nothing"), 404)
    _error(client.put("/v1/predict", json={}), 405)
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.post("/v1/predict", json={"adapter": "alpha", "inputs": TEXTS}).status_code == 200
    text = client.get("/metrics").text
    assert 'lorakit_requests_total{route="/v1/predict",status="200"}' in text
    assert (
        "lorakit_batch_rows_bucket" in text
        and "lorakit_adapters_loaded" in text
        and 'lorakit_request_seconds_bucket{route="/v1/predict",le="+Inf"}' in text
    )
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/adapters", "/v1/adapters/{name}", "/healthz", "/metrics"} <= set(
        schema["paths"]
    )
    assert "/v1/chat/completions" not in schema["paths"]  # the schema is what this server answers


def test_admin_routes_are_off_without_a_token(engine) -> None:
    from fastapi.testclient import TestClient

    c = TestClient(create_app(engine))
    assert "--admin-token" in _error(
        c.post("/v1/adapters", json={"name": "gamma"}, headers={"Authorization": "Bearer x"}), 403
    )


def test_lru_evicts_and_reloads_and_single_adapter_is_merged(adapters) -> None:
    e = Engine(
        [f"alpha={adapters['alpha']}", f"beta={adapters['beta']}", f"gamma={adapters['gamma']}"],
        max_adapters=1,
        window_ms=0,
    )
    try:
        for name in ("alpha", "beta", "gamma", "alpha"):
            got = torch.stack(e.submit(name, e.encode(name, TEXTS)).result(timeout=60))
            assert torch.allclose(got, _single(adapters[name], TEXTS), atol=1e-5), name
        # The first adapter stays (it holds peft's layers); the others take turns in the one free place.
        assert e.stats.evictions >= 2 and set(e.loaded) == {"alpha", "gamma"}
    finally:
        e.close()
    solo = Engine([f"alpha={adapters['alpha']}"], window_ms=0)
    try:
        assert solo._merged  # one adapter: LoRA folded into the weights
        got = torch.stack(solo.submit("alpha", solo.encode("alpha", TEXTS)).result(timeout=60))
        assert torch.allclose(got, _single(adapters["alpha"], TEXTS), atol=1e-5)
    finally:
        solo.close()


def test_image_adapter_over_base64_and_refused_paths(tmp_path: Path, tiny_vit_dir: Path) -> None:
    from fastapi.testclient import TestClient
    from PIL import Image

    run = lorakit.train(
        make_image_config(tmp_path, tiny_vit_dir, make_images(tmp_path / "img", per_class=16)), progress=False
    )
    e = Engine([f"colours={run.adapter_dir}"], window_ms=0)
    try:
        c = TestClient(create_app(e))
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), (200, 40, 40)).save(buf, format="PNG")
        r = c.post(
            "/v1/predict",
            json={"adapter": "colours", "inputs": [base64.b64encode(buf.getvalue()).decode()], "top_k": 2},
        )
        assert r.status_code == 200, r.text
        want = lorakit.predict(run.adapter_dir, [Image.open(io.BytesIO(buf.getvalue()))], top_k=2)[0]
        assert (
            r.json()["predictions"][0]["label"] == want["label"]
            and abs(r.json()["predictions"][0]["score"] - want["score"]) < 1e-5
        )
        assert "base64" in _error(
            c.post("/v1/predict", json={"adapter": "colours", "inputs": ["/etc/passwd"]}), 422
        )
        assert "inputs[0]" in _error(
            c.post(
                "/v1/predict",
                json={"adapter": "colours", "inputs": [base64.b64encode(b"not an image").decode()]},
            ),
            422,
        )
        assert "base64" in _error(
            c.post("/v1/predict", json={"adapter": "colours", "inputs": ["%%% not base64"]}), 422
        )
    finally:
        e.close()


def test_chat_completions_mixed_adapters_equal_single(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from fastapi.testclient import TestClient

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_chat_rows(48)))
    runs = {}
    for name, seed in (("one", 1), ("two", 2)):
        (tmp_path / name).mkdir()
        runs[name] = lorakit.train(
            make_lm_config(
                tmp_path / name,
                tiny_llama_dir,
                data,
                train={"epochs": 2, "seed": seed, "generation_samples": 0},
            ),
            progress=False,
        )
    e = Engine([f"{n}={r.adapter_dir}" for n, r in runs.items()], window_ms=50)
    try:
        c = TestClient(create_app(e))
        question = [{"role": "user", "content": "what colour is the sky ?"}]
        r = c.post(
            "/v1/chat/completions",
            json={"model": "one", "messages": question, "max_tokens": 4, "temperature": 0, "user": "x"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["prompt_tokens"] > 0
        from lorakit.serving.prediction import generate

        assert (
            body["choices"][0]["message"]["content"]
            == generate(
                runs["one"].adapter_dir, ["what colour is the sky ?"], max_new_tokens=4, device="cpu"
            )[0]["output"]
        )
        # Two adapters in one generate call (mixed batch) answer as each does alone.
        before = e.stats.batches
        options = GenerateOptions(max_new_tokens=4)  # greedy
        futures = {n: e.submit(n, [e.encode_chat(n, question)], options) for n in runs}
        mixed = {n: f.result(timeout=120)[0] for n, f in futures.items()}
        assert e.stats.batches == before + 1
        for n, r_ in runs.items():
            assert (
                mixed[n]
                == generate(r_.adapter_dir, ["what colour is the sky ?"], max_new_tokens=4, device="cpu")[0][
                    "output"
                ]
            )
        assert "stream" in _error(
            c.post("/v1/chat/completions", json={"model": "one", "messages": question, "stream": True}), 422
        )
        assert "messages" in _error(
            c.post("/v1/chat/completions", json={"model": "one", "messages": []}), 422
        )
        assert "/v1/chat/completions" in _error(
            c.post("/v1/predict", json={"adapter": "one", "inputs": ["x"]}), 404
        )
    finally:
        e.close()


@pytest.mark.slow  # a `lorakit serve` process
def test_real_uvicorn_process_over_http(adapters) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit",
            "serve",
            f"alpha={adapters['alpha']}",
            f"beta={adapters['beta']}",
            "--port",
            str(port),
            "--registry",
            str(adapters["registry"]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=1) as r:
                    if json.load(r)["status"] == "ok":
                        break
            except OSError:
                time.sleep(0.25)
        else:
            pytest.fail(
                "server did not start: " + (proc.stderr.read() if proc.poll() is not None else "timeout")
            )
        req = urllib.request.Request(
            base + "/v1/predict",
            data=json.dumps({"adapter": "beta", "inputs": TEXTS}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            preds = json.load(r)["predictions"]
        assert [p["label"] for p in preds] == [p["label"] for p in lorakit.predict(adapters["beta"], TEXTS)]
        bad = urllib.request.Request(
            base + "/v1/predict",
            data=b'{"adapter": "nobody", "inputs": ["x"]}',
            headers={"content-type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=30)
        assert e.value.code == 404 and "error" in json.load(e.value)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("ranks", [(4, 4, 4), (4, 8, 4)])
def test_gathered_mixed_batches_equal_peft_loop(ranks: tuple[int, ...]) -> None:
    """The gathered LoRA kernel gives peft's mixed-batch outputs (other ranks in one batch: peft's loop)."""
    from peft import LoraConfig, get_peft_model

    from lorakit.serving import mixed

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    model = get_peft_model(
        net, LoraConfig(r=ranks[0], lora_alpha=8, target_modules=["0", "2"]), adapter_name="x"
    )
    for i, r in enumerate(ranks[1:]):
        model.add_adapter(f"y{i}", LoraConfig(r=r, lora_alpha=8, target_modules=["0", "2"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    model.eval()
    x = torch.randn(7, 5, 16)
    names = ["x", "y0", "__base__", "y1", "x", "y0", "__base__"]
    every = ["y1", "x", "x", "y0", "y1", "y0", "x"]  # no base rows: the in-place path when ranks agree
    cases = [(x, names), (x, every), (x[:, 0], every)]  # tokens, and flat rows
    with torch.no_grad():
        wants = [model(inp, adapter_names=rows) for inp, rows in cases]
        assert mixed.install(model) == 2
        for (inp, rows), w in zip(cases, wants, strict=True):
            assert torch.allclose(model(inp, adapter_names=rows), w, atol=1e-5)
        got = model(x, adapter_names=names)
        with model.disable_adapter():
            base = model(x)
        assert torch.equal(got[2], base[2]) and not torch.allclose(got[0], base[0])


def test_half_precision_adapter_storage(adapters) -> None:
    """float16 storage halves the LoRA memory; answers stay within float16 rounding of float32."""
    e = Engine(
        [f"alpha={adapters['alpha']}", f"beta={adapters['beta']}"], adapter_dtype="float16", window_ms=20
    )
    try:
        lora = [p for n, p in e.model.named_parameters() if "lora_" in n]
        assert lora and all(p.dtype == torch.float16 for p in lora) and not e.merge_single
        futures = {n: e.submit(n, e.encode(n, TEXTS)) for n in ("alpha", "beta")}
        for name, f in futures.items():
            got = torch.stack(f.result(timeout=60))
            want = _single(adapters[name], TEXTS)
            assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-3), (
                (got - want).abs().max()
            )
    finally:
        e.close()
    with pytest.raises(lorakit.AdapterError, match="not one of"):
        Engine([f"alpha={adapters['alpha']}"], adapter_dtype="int8")


def test_models_that_cannot_mix_heads_run_one_pass_per_adapter(adapters, monkeypatch) -> None:
    """peft refuses mixed batches for some trained heads
    (e.g. BatchNorm in CNNs): one pass per adapter then."""
    from peft.utils.other import ModulesToSaveWrapper

    def refuse(self, *args, **kwargs):
        raise TypeError("Mixed batching is only supported for the following modules: Linear.")

    monkeypatch.setattr(ModulesToSaveWrapper, "_mixed_batch_forward", refuse)
    monkeypatch.setattr(
        "lorakit.serving.mixed.AdapterStore.fits", lambda self, folder: False
    )  # as for BatchNorm heads
    e = Engine([f"alpha={adapters['alpha']}", f"beta={adapters['beta']}"], window_ms=50, allow_base=True)
    try:
        futures = {n: e.submit(n, e.encode(n, TEXTS)) for n in ("alpha", "beta", "base")}
        got = {n: torch.stack(f.result(timeout=60)) for n, f in futures.items()}
        assert not e.mixed_ok
        for name in ("alpha", "beta"):
            assert torch.allclose(got[name], _single(adapters[name], TEXTS), atol=1e-5), name
    finally:
        e.close()


def test_the_idle_engine_gives_freed_heap_pages_back(adapters, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resident memory stays flat under traffic (bench/soak.py) because the worker trims glibc's heap
    when no request waits, at most once a second; never while requests queue."""
    import lorakit.serving.engine as engine_module

    calls: list[float] = []
    monkeypatch.setattr(engine_module, "trim_heap", lambda: calls.append(time.monotonic()) or True)
    monkeypatch.setattr(engine_module, "TRIM_EVERY_S", 0.2)
    e = Engine([f"alpha={adapters['alpha']}"], window_ms=5)
    try:
        for _ in range(3):
            e.submit("alpha", e.encode("alpha", ["a fine film"])).result(timeout=60)
            time.sleep(0.3)
        e.submit("alpha", e.encode("alpha", ["a fine film"])).result(timeout=60)  # wakes the worker
        assert len(calls) >= 2
        assert all(b - a >= 0.2 for a, b in itertools.pairwise(calls))
    finally:
        e.close()
