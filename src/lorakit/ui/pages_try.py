"""The "try it" page and its JSON API: labels with probabilities, or the adapter's and the base
model's answers, from the engine of ``lorakit serve`` (:mod:`.tryit`)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError

from lorakit.ui.tryit import Playground
from lorakit.ui.workspace import Workspace, WorkspaceError, read_run


class PredictBody(BaseModel):
    """Try-it request of a classification adapter."""

    inputs: list[str] = Field(
        min_length=1,
        max_length=16,
        description="Texts, or base64 image bytes (data: URLs accepted) for image adapters.",
    )
    top_k: int = Field(5, ge=1, le=50, description="Labels shown per input.")


class ChatBody(BaseModel):
    """Try-it request of a causal-LM adapter."""

    message: str = Field(min_length=1, max_length=8000, description="The user's message.")
    max_new_tokens: int = Field(64, ge=1, le=512, description="Longest answer in tokens.")


def add_routes(app: FastAPI, ws: Workspace, page: Any, playground: Playground) -> None:
    """Register the try-it page and ``/api/runs/<name>/{predict,chat}`` on ``app``."""

    # ---- try it -------------------------------------------------------------------------------------
    @app.get("/runs/{name}/try", response_class=HTMLResponse)
    async def try_page(request: Request, name: str) -> HTMLResponse:
        info = read_run(ws, name)
        adapter = info.path / "adapter"
        if not adapter.is_dir():
            raise WorkspaceError(
                f"run '{name}' has no adapter yet (it is {info.status}); try it once it has finished"
            )
        kind = await run_in_threadpool(playground.kind, adapter)
        binary = playground.engine(adapter).task.binary_inputs
        return page(request, "try.html", run=info, kind=kind, binary=binary)

    @app.post("/api/runs/{name}/predict")
    async def api_predict(name: str, request: Request) -> JSONResponse:
        body = await _body(request, PredictBody)
        adapter = _adapter_dir(ws, name)
        engine = await run_in_threadpool(playground.engine, adapter)
        inputs = _decode(body.inputs) if engine.task.binary_inputs else body.inputs
        return JSONResponse(
            {"predictions": await run_in_threadpool(playground.classify, adapter, inputs, body.top_k)}
        )

    @app.post("/api/runs/{name}/chat")
    async def api_chat(name: str, request: Request) -> JSONResponse:
        body = await _body(request, ChatBody)
        answers = await run_in_threadpool(
            playground.chat, _adapter_dir(ws, name), body.message, body.max_new_tokens
        )
        return JSONResponse(answers)


async def _body(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(await request.json())
    except (ValueError, ValidationError) as exc:
        errors = exc.errors() if isinstance(exc, ValidationError) else [{"loc": ("body",), "msg": "not JSON"}]
        raise WorkspaceError(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        ) from None


def _decode(items: list[str]) -> list[bytes]:
    try:
        return [
            base64.b64decode(s.split(",", 1)[1] if s.startswith("data:") else s, validate=True) for s in items
        ]
    except (binascii.Error, ValueError):
        raise WorkspaceError("inputs: an image must come as base64 bytes (a data: URL)") from None


def _adapter_dir(ws: Workspace, name: str) -> Path:
    adapter = ws.run_dir(name) / "adapter"
    if not adapter.is_dir():
        raise WorkspaceError(f"run '{name}' has no adapter (yet)")
    return ws.inside(adapter)
