"""The HTTP server: a FastAPI app factory over an :class:`~lorakit.serving.engine.Engine`.

Routes (OpenAPI schema at ``/openapi.json``):

    POST   /v1/predict            {adapter, inputs: [...], top_k}      classification adapters
    POST   /v1/chat/completions   OpenAI chat shape, ``model`` = adapter   causal-lm adapters
    GET    /v1/adapters           served adapters
    POST   /v1/adapters           admin (bearer token): load a registry adapter
    DELETE /v1/adapters/{name}    admin (bearer token): unload
    GET    /healthz, /metrics     liveness; Prometheus text format

Every error is JSON ``{"error": {"type", "message"}}`` with a 4xx code for bad input; request bodies
are bounded in bytes, inputs per request and string lengths; each request has a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import threading
import time
import uuid
from collections import Counter, defaultdict
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from lorakit.adapters.registry import RegistryError
from lorakit.errors import AdapterError, LorakitError
from lorakit.serving.engine import Engine, UnknownAdapter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
AdapterName = Annotated[str, StringConstraints(min_length=1, max_length=80)]
Text = Annotated[str, StringConstraints(max_length=200_000)]


# --------------------------------------------------------------------------------------------------
# Request and response schemas
# --------------------------------------------------------------------------------------------------


class PredictRequest(BaseModel):
    """Classify texts, or images given as base64 strings or http(s) URLs."""

    model_config = ConfigDict(extra="forbid")
    adapter: AdapterName = Field(description="Adapter name (a registry name may carry a version, name:3).")
    inputs: list[Text] = Field(
        min_length=1,
        max_length=256,
        description="Texts; for image adapters base64-encoded image bytes or http(s) URLs.",
    )
    top_k: int = Field(1, ge=1, le=100, description="How many labels to return per input, most likely first.")


class LabelScore(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    label: str
    score: float
    top_k: list[LabelScore]


class PredictResponse(BaseModel):
    adapter: str
    predictions: list[Prediction]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(BaseModel):
    """OpenAI chat completion request; ``model`` names the adapter. Unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: AdapterName
    messages: list[ChatMessage] = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")
    stream: Literal[False] = Field(False, description="Streaming is not supported.")


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: AdapterName = Field(description="Registry name, optionally with a version (name:3).")


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# --------------------------------------------------------------------------------------------------
# Metrics (Prometheus text exposition, no extra dependency)
# --------------------------------------------------------------------------------------------------


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, list[int]] = defaultdict(lambda: [0] * (len(LATENCY_BUCKETS) + 1))
        self.latency_sum: Counter[str] = Counter()

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            buckets = self.latency[route]
            buckets[
                next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
            ] += 1
            self.latency_sum[route] += seconds

    def render(self, engine: Engine) -> str:
        out = [
            "# HELP lorakit_requests_total Requests by route and status.",
            "# TYPE lorakit_requests_total counter",
        ]
        with self._lock:
            for (route, status), n in sorted(self.requests.items()):
                out.append(f'lorakit_requests_total{{route="{route}",status="{status}"}} {n}')
            out += [
                "# HELP lorakit_request_seconds Request latency.",
                "# TYPE lorakit_request_seconds histogram",
            ]
            for route, counts in sorted(self.latency.items()):
                cum = 0
                for b, c in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                    cum += c
                    le = "+Inf" if b == float("inf") else f"{b}"
                    out.append(f'lorakit_request_seconds_bucket{{route="{route}",le="{le}"}} {cum}')
                out.append(f'lorakit_request_seconds_sum{{route="{route}"}} {self.latency_sum[route]:.6f}')
                out.append(f'lorakit_request_seconds_count{{route="{route}"}} {cum}')
        sizes = list(engine.stats.batch_sizes)
        out += [
            "# HELP lorakit_batch_rows Rows per forward pass (recent batches).",
            "# TYPE lorakit_batch_rows histogram",
        ]
        for b in BATCH_BUCKETS:
            out.append(f'lorakit_batch_rows_bucket{{le="{b}"}} {sum(1 for s in sizes if s <= b)}')
        out.append(f'lorakit_batch_rows_bucket{{le="+Inf"}} {len(sizes)}')
        out.append(f"lorakit_batch_rows_sum {sum(sizes)}")
        out.append(f"lorakit_batch_rows_count {len(sizes)}")
        out += [
            "# HELP lorakit_batches_total Forward passes run.",
            "# TYPE lorakit_batches_total counter",
            f"lorakit_batches_total {engine.stats.batches}",
            "# HELP lorakit_adapters_loaded Adapters in the model now.",
            "# TYPE lorakit_adapters_loaded gauge",
            f"lorakit_adapters_loaded {len(engine.loaded)}",
            "# HELP lorakit_adapters_known Adapters the server can answer for.",
            "# TYPE lorakit_adapters_known gauge",
            f"lorakit_adapters_known {len(engine.known)}",
            "# HELP lorakit_adapter_loads_total Adapter loads (incl. on demand).",
            "# TYPE lorakit_adapter_loads_total counter",
            f"lorakit_adapter_loads_total {engine.stats.loads}",
            "# HELP lorakit_adapter_evictions_total Adapters unloaded by the LRU.",
            "# TYPE lorakit_adapter_evictions_total counter",
            f"lorakit_adapter_evictions_total {engine.stats.evictions}",
        ]
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


class _BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes (declared or streamed) with 413."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _send_json(
                send,
                413,
                "request_too_large",
                f"request body over {self.limit} bytes; send fewer or smaller inputs",
            )
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_json(
                send,
                413,
                "request_too_large",
                f"request body over {self.limit} bytes; send fewer or smaller inputs",
            )


class _TooLarge(Exception):
    pass


async def _send_json(send: Any, status: int, kind: str, message: str) -> None:
    import json

    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(
    engine: Engine,
    *,
    admin_token: str | None = None,
    max_body_bytes: int = 8 * 1024 * 1024,
    request_timeout: float = 60.0,
    max_queue: int = 1024,
) -> Any:
    """Build the FastAPI app for ``engine``.

    Args:
        engine: The loaded engine (it fixes task and base model).
        admin_token: Bearer token for the admin routes; None disables them (403).
        max_body_bytes: Largest request body accepted.
        request_timeout: Seconds a request may wait for its result (504 after).
        max_queue: Requests waiting for the model before new ones get 503.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(
        title="lorakit",
        version=_version(),
        description=f"{engine.task.name} adapters on one base model, batched across adapters.",
    )
    metrics = Metrics()
    errors = {
        404: "not_found",
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        405: "method_not_allowed",
        422: "invalid_request",
        503: "overloaded",
        504: "timeout",
    }

    class ApiError(Exception):
        def __init__(self, status: int, message: str) -> None:
            self.status, self.message = status, message

    def err(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(
            {"error": {"type": errors.get(status, "error"), "message": message}},
            status_code=status,
            headers=headers,
        )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return err(exc.status, exc.message, {"Retry-After": "1"} if exc.status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        return err(422, "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return err(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:  # a server fault, never bad input
        return err(500, f"internal error ({type(exc).__name__}); see the server log")

    @app.middleware("http")
    async def _observe(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.observe(getattr(route, "path", "other"), response.status_code, time.perf_counter() - start)
        return response

    def admin(request: Request) -> None:
        if admin_token is None:
            raise ApiError(
                403, "admin routes are disabled; start the server with --admin-token (or LORAKIT_ADMIN_TOKEN)"
            )
        got = request.headers.get("authorization", "")
        if not got.startswith("Bearer ") or not hmac.compare_digest(got[7:].encode(), admin_token.encode()):
            raise ApiError(401, "admin route: send the header 'Authorization: Bearer <admin token>'")

    def user_error(exc: Exception) -> ApiError:
        if isinstance(exc, UnknownAdapter):
            return ApiError(404, str(exc))
        if isinstance(exc, LorakitError):
            return ApiError(
                400 if isinstance(exc, (AdapterError, RegistryError)) else 422, " ".join(str(exc).split())
            )
        raise exc

    async def run(adapter: str, encode: Any, options: tuple = ()) -> list[Any]:
        if engine._queue.qsize() >= max_queue:
            raise ApiError(503, "the server is busy; retry shortly")
        try:
            rows = await run_in_threadpool(encode)
            future = engine.submit(adapter, rows, options)
        except Exception as exc:
            raise user_error(exc) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=request_timeout)
        except TimeoutError:
            future.cancel()
            raise ApiError(
                504, f"no result within {request_timeout:g} s; retry, or send fewer inputs"
            ) from None
        except Exception as exc:
            raise user_error(exc) from None

    def need(generates: bool, route: str) -> None:
        # The task declares what it answers with: labels (/v1/predict) or generated text (chat).
        if engine.task.generates != generates:
            other = "/v1/chat/completions" if engine.task.generates else "/v1/predict"
            raise ApiError(404, f"{route} is not served for {engine.task.name} adapters; use {other}")

    # ---- routes ---------------------------------------------------------------------------------
    responses = {c: {"model": ErrorResponse} for c in (400, 401, 403, 404, 413, 422, 503, 504)}

    @app.post("/v1/predict", response_model=PredictResponse, responses=responses)
    async def predict(req: PredictRequest) -> PredictResponse:
        need(False, "/v1/predict")
        inputs = _decode_inputs(req.inputs, engine.task.binary_inputs, ApiError)
        logits = await run(req.adapter, lambda: engine.encode(req.adapter, inputs))
        info = engine.info(req.adapter)
        import torch

        records = engine.task.top_k(torch.stack(logits), ["" for _ in logits], info.label_space, req.top_k)
        return PredictResponse(
            adapter=req.adapter,
            predictions=[Prediction(label=r["label"], score=r["score"], top_k=r["top_k"]) for r in records],
        )

    @app.post("/v1/chat/completions", responses=responses)
    async def chat(req: ChatRequest) -> dict[str, Any]:
        need(True, "/v1/chat/completions")
        max_new = req.max_completion_tokens or req.max_tokens or 256
        messages = [m.model_dump() for m in req.messages]
        try:
            prompt = await run_in_threadpool(engine.encode_chat, req.model, messages)
        except Exception as exc:
            raise user_error(exc) from None
        limit = engine.context_length
        if limit:
            if len(prompt) >= limit:
                raise ApiError(
                    422,
                    f"messages: the conversation is {len(prompt)} tokens and this model reads "
                    f"at most {limit}; shorten it",
                )
            max_new = min(max_new, limit - len(prompt))
        do_sample = req.temperature > 0
        options = (max_new, do_sample, req.temperature if do_sample else 1.0, req.top_p if do_sample else 1.0)
        text = (await run(req.model, lambda: [prompt], options))[0]
        completion = len(engine.processor(text, add_special_tokens=False)["input_ids"]) if text else 0
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "length" if completion >= max_new else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": completion,
                "total_tokens": len(prompt) + completion,
            },
        }

    @app.get("/v1/adapters")
    async def list_adapters() -> dict[str, Any]:
        return {"task": engine.task.name, "base_model": engine.base_name, "adapters": engine.adapters()}

    @app.post("/v1/adapters", status_code=201, responses=responses)
    async def load_adapter(req: LoadRequest, request: Request) -> dict[str, Any]:
        admin(request)
        if engine.registry is None:
            raise ApiError(
                400, "this server has no registry (--registry); adapters can only be loaded from one"
            )
        try:
            info = await run_in_threadpool(engine.add, req.name)
        except Exception as exc:
            raise user_error(exc) from None
        return info.describe(info.name in engine.loaded)

    @app.delete("/v1/adapters/{name}", responses=responses)
    async def unload_adapter(
        name: Annotated[str, StringConstraints(max_length=80)], request: Request
    ) -> dict[str, Any]:
        admin(request)
        try:
            await run_in_threadpool(engine.remove, name)
        except Exception as exc:
            raise user_error(exc) from None
        return {"deleted": name}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "task": engine.task.name, "adapters": len(engine.known)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        return metrics.render(engine)

    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    app.state.engine = engine
    return app


def _decode_inputs(inputs: list[str], binary: bool, error: Any) -> list[Any]:
    """Texts stay texts; for tasks with binary inputs (images)
    base64 strings become bytes and URLs stay URLs."""
    if not binary:
        return list(inputs)
    out: list[Any] = []
    for i, item in enumerate(inputs):
        if item.startswith(("http://", "https://")):
            out.append(item)
            continue
        try:
            out.append(
                base64.b64decode(item.split(",", 1)[1] if item.startswith("data:") else item, validate=True)
            )
        except (binascii.Error, ValueError):
            raise error(422, f"inputs[{i}]: not base64 image bytes or an http(s) URL") from None
    return out


def _version() -> str:
    from importlib.metadata import version

    return version("lorakit")
