"""The server's own routes, the same for every task: the adapters it serves (listed by anyone, loaded
from the registry and unloaded with the admin token), liveness, and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from lorakit.serving.errors import RESPONSES, ApiError
from lorakit.serving.served import Served

AdapterName = Annotated[str, StringConstraints(min_length=1, max_length=80)]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: AdapterName = Field(description="Registry name, optionally with a version (name:3).")


def add_routes(app: FastAPI, served: Served) -> None:
    """Register ``/v1/adapters`` (GET, POST, DELETE), ``/healthz`` and ``/metrics``."""
    engine = served.engine

    @app.get("/v1/adapters")
    async def list_adapters() -> dict[str, Any]:
        return {"task": engine.task.name, "base_model": engine.base_name, "adapters": engine.adapters()}

    @app.post("/v1/adapters", status_code=201, responses=RESPONSES)
    async def load_adapter(req: LoadRequest, request: Request) -> dict[str, Any]:
        served.admin(request)
        if engine.registry is None:
            raise ApiError(
                400, "this server has no registry (--registry); adapters can only be loaded from one"
            )
        info = await served.in_thread(engine.add, req.name)
        return info.describe(info.name in engine.loaded)

    @app.delete("/v1/adapters/{name}", responses=RESPONSES)
    async def unload_adapter(
        name: Annotated[str, StringConstraints(max_length=80)], request: Request
    ) -> dict[str, Any]:
        served.admin(request)
        await served.in_thread(engine.remove, name)
        return {"deleted": name}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "task": engine.task.name, "adapters": len(engine.known)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        return served.metrics.render(engine)
