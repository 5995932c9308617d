"""The "try it" page and its JSON API: labels with probabilities, or the adapter's and the base
model's answers, from the engine of ``lorakit serve`` (:mod:`.tryit`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError

from lorakit.ui.tryit import Playground
from lorakit.ui.workspace import Workspace, WorkspaceError, read_run


class PredictBody(BaseModel):
    """Try-it request of an adapter that answers ``predict``."""

    inputs: list[str] = Field(
        min_length=1,
        max_length=16,
        description="Texts, or images as data: URLs (base64 bytes), as the task reads them.",
    )
    top_k: int = Field(5, ge=1, le=50, description="Labels shown per input.")


class ChatBody(BaseModel):
    """Try-it request of an adapter that answers ``generate``."""

    message: str = Field(min_length=1, max_length=8000, description="The user's message.")
    max_new_tokens: int = Field(64, ge=1, le=512, description="Longest answer in tokens.")


#: The try-it API route of each command a task can answer (:data:`lorakit.tasks.base.ANSWERS`).
ACTIONS = {"predict": "predict", "generate": "chat"}


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
        widget = await run_in_threadpool(playground.widget, adapter)
        return page(request, "try.html", run=info, widget=widget)

    @app.post("/api/runs/{name}/predict")
    async def api_predict(name: str, request: Request) -> JSONResponse:
        body = await _body(request, PredictBody)
        adapter = await _answering(playground, ws, name, "predict")
        records = await run_in_threadpool(playground.predict, adapter, body.inputs, body.top_k)
        return JSONResponse({"predictions": records})

    @app.post("/api/runs/{name}/chat")
    async def api_chat(name: str, request: Request) -> JSONResponse:
        body = await _body(request, ChatBody)
        adapter = await _answering(playground, ws, name, "chat")
        return JSONResponse(
            await run_in_threadpool(playground.chat, adapter, body.message, body.max_new_tokens)
        )


async def _answering(playground: Playground, ws: Workspace, name: str, action: str) -> Path:
    """The run's adapter folder, when its task answers ``action``.

    Raises:
        AdapterError: The task answers with the other route (named in the one-line message).
    """
    adapter = _adapter_dir(ws, name)
    task = (await run_in_threadpool(playground.engine, adapter)).task
    if ACTIONS[task.cli_command] != action:
        raise task.refusal(f"/api/runs/{name}/{action}", f"/api/runs/{name}/{ACTIONS[task.cli_command]}")
    return adapter


async def _body(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(await request.json())
    except (ValueError, ValidationError) as exc:
        errors = exc.errors() if isinstance(exc, ValidationError) else [{"loc": ("body",), "msg": "not JSON"}]
        raise WorkspaceError(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        ) from None


def _adapter_dir(ws: Workspace, name: str) -> Path:
    adapter = ws.run_dir(name) / "adapter"
    if not adapter.is_dir():
        raise WorkspaceError(f"run '{name}' has no adapter (yet)")
    return ws.inside(adapter)
