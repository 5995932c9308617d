"""The HTTP server: a FastAPI app factory over an :class:`~lorakit.serving.engine.Engine`.

Routes (OpenAPI schema at ``/openapi.json``):

    POST   /v1/predict            {adapter, inputs: [...], top_k}      tasks that answer `predict`
    POST   /v1/chat/completions   OpenAI chat shape, ``model`` = adapter   tasks that answer `generate`
    POST   /v1/completions        refused for every task (404 naming the route that answers)
    GET    /v1/adapters           served adapters
    POST   /v1/adapters           admin (bearer token): load a registry adapter
    DELETE /v1/adapters/{name}    admin (bearer token): unload
    GET    /healthz, /metrics     liveness; Prometheus text format

The engine's task says which of the two answer routes is served (``Task.cli_command``) and what its
requests and answers look like; the other route answers 404 with one line naming the right one. Every
error is JSON ``{"error": {"type", "message"}}`` (:mod:`.errors`); request bodies are bounded in bytes,
inputs per request and string lengths; each request has a timeout.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request

from lorakit.serving import errors, routes_admin, routes_chat, routes_predict
from lorakit.serving.engine import Engine
from lorakit.serving.errors import ApiError
from lorakit.serving.metrics import Metrics
from lorakit.serving.served import Served

#: The answer route of each command a task can answer (:data:`lorakit.tasks.base.ANSWERS`).
ANSWER_ROUTES = {"predict": routes_predict, "generate": routes_chat}
#: OpenAI routes that clients try and lorakit serves for no task (plain-text completion): refused in one
#: line naming the route that answers, not a bare 404.
UNSERVED_ROUTES = ("/v1/completions",)


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
    task = engine.task
    app = FastAPI(
        title="lorakit",
        version=_version(),
        description=f"{task.name} adapters on one base model, batched across adapters.",
    )
    served = Served(engine, Metrics(), admin_token, request_timeout, max_queue)
    errors.install(app)
    _observe_latency(app, served.metrics)
    ANSWER_ROUTES[task.cli_command].add_routes(app, served)
    answered = ANSWER_ROUTES[task.cli_command].PATH
    for command, routes in ANSWER_ROUTES.items():
        if command != task.cli_command:
            _refuse(app, routes.PATH, task.refusal(routes.PATH, answered).args[0])
    for path in UNSERVED_ROUTES:
        _refuse(app, path, task.refusal(path, answered).args[0])
    routes_admin.add_routes(app, served)
    app.add_middleware(errors.BodyLimit, limit=max_body_bytes)
    app.state.engine = engine
    return app


def _observe_latency(app: FastAPI, metrics: Metrics) -> None:
    @app.middleware("http")
    async def _observe(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.observe(getattr(route, "path", "other"), response.status_code, time.perf_counter() - start)
        return response


def _refuse(app: FastAPI, path: str, message: str) -> None:
    """``path`` answers 404 with ``message``: a route of another kind of task (not in the schema)."""

    @app.post(path, include_in_schema=False)
    async def _other_task() -> None:
        raise ApiError(404, message)


def _version() -> str:
    from importlib.metadata import version

    return version("lorakit")
