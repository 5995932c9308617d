"""`lorakit ui`: a FastAPI app factory serving server-rendered pages over one workspace folder.

    /                     runs table (sortable)            /runs/<name>          run page, live (SSE)
    /new                  new-run form (from the schema)   /runs/<name>/try      try the adapter
    /compare?run=a&run=b  differing config keys, metrics, overlaid curves
    /registry             published versions: publish, model card, delete

All state lives in the workspace (see :mod:`.workspace`); the app holds only its engine cache.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import mimetypes
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field, ValidationError

from lorakit.config import TASKS
from lorakit.errors import LorakitError
from lorakit.ui import forms, launch
from lorakit.ui.compare import compare_runs
from lorakit.ui.progress import read_progress, signature
from lorakit.ui.security import Guard
from lorakit.ui.tryit import Playground
from lorakit.ui.workspace import (
    Workspace,
    WorkspaceError,
    check_name,
    list_runs,
    read_json,
    read_run,
    read_yaml,
    run_status,
)

HERE = Path(__file__).parent
SORT_KEYS = {"name", "task", "base_model", "status", "best_value", "test_value", "seconds", "started"}


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


class PublishForm(BaseModel):
    """Publish a finished run's adapter under a registry name."""

    run: str = Field(description="Run folder name.")
    name: str = Field(description="Registry name.")


def create_app(workspace: str | Path, *, token: str | None = None, loopback: bool = True) -> FastAPI:
    """The UI over ``workspace``.

    Args:
        workspace: Folder with ``runs/`` (created when missing), ``configs/`` and ``registry/``. Runs
            are started from it; the process should run in it too (``lorakit ui`` changes into it),
            so that relative paths in run configs (a base model, say) name the same files as for train.
        token: Required on every request when set (see :mod:`.security`).
        loopback: The server listens on the loopback interface only (host names are checked).

    Returns:
        The ASGI app.
    """
    ws = Workspace(Path(workspace))
    ws.runs.mkdir(parents=True, exist_ok=True)
    playground = Playground()
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["num"] = lambda v, d=4: (
        "" if v is None else f"{v:.{d}f}" if isinstance(v, float) else str(v)
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        yield
        playground.close()  # the engines' worker threads

    app = FastAPI(title="lorakit ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, token=token, loopback=loopback)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.state.workspace, app.state.playground = ws, playground

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(
            request, name, {"workspace": ws.root, **context}, status_code=status
        )

    @app.exception_handler(LorakitError)
    async def user_error(request: Request, exc: LorakitError) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc)}, status_code=400)
        return page(request, "message.html", 400, title="Cannot do that", message=str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=422)
        return page(request, "message.html", 422, title="Bad request", message=message)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:  # never a stack trace on a page
        message = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=500)
        return page(request, "message.html", 500, title="Something went wrong", message=message)

    # ---- runs ---------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def runs_page(request: Request, sort: str = "started", desc: int = 1) -> HTMLResponse:
        key = sort if sort in SORT_KEYS else "started"
        runs = await run_in_threadpool(list_runs, ws)
        present = [r for r in runs if getattr(r, key) is not None]
        present.sort(key=lambda r: getattr(r, key), reverse=bool(desc))
        rows = present + [r for r in runs if getattr(r, key) is None]
        return page(request, "runs.html", runs=rows, sort=key, desc=bool(desc))

    @app.get("/runs/{name}", response_class=HTMLResponse)
    async def run_page(request: Request, name: str) -> HTMLResponse:
        info = await run_in_threadpool(read_run, ws, name)
        if not info.path.exists() and not info.ui:
            raise WorkspaceError(f"no run named '{name}' in {ws.runs}")
        progress = await run_in_threadpool(read_progress, info.path)
        out = ws.state_file(name, ".out")
        console = (
            out.read_text(encoding="utf-8", errors="replace").splitlines()[-15:] if out.is_file() else []
        )
        labels = _labels(info.metrics)
        return page(
            request,
            "run.html",
            run=info,
            progress=progress,
            console=console,
            labels=labels,
            report=(info.path / "report" / "index.html").is_file(),
            adapter=(info.path / "adapter").is_dir(),
        )

    @app.get("/runs/{name}/events")
    async def run_events(request: Request, name: str) -> StreamingResponse:
        run = ws.run_dir(name)

        async def stream() -> Any:
            last, quiet = None, 0.0
            while not await request.is_disconnected():
                ui = read_json(ws.state_file(name, ".json")) or {}
                status = run_status(run, ui)
                sig = (*signature(run), status)
                if sig != last:
                    last, quiet = sig, 0.0
                    data = await run_in_threadpool(read_progress, run)
                    yield f"event: progress\ndata: {json.dumps(data | {'status': status})}\n\n"
                    if status != "running":
                        yield "event: end\ndata: {}\n\n"
                        return
                elif quiet > 15:  # a comment line keeps proxies from closing the stream
                    yield ": ping\n\n"
                    quiet = 0.0
                await asyncio.sleep(0.5)
                quiet += 0.5

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/runs/{name}/stop")
    async def stop(name: str) -> RedirectResponse:
        launch.stop_run(ws, name)
        return RedirectResponse(f"/runs/{name}", status_code=303)

    @app.post("/runs/{name}/resume")
    async def resume(name: str) -> RedirectResponse:
        await run_in_threadpool(launch.resume_run, ws, name)
        return RedirectResponse(f"/runs/{name}", status_code=303)

    @app.get("/runs/{name}/report/{path:path}")
    async def report_file(name: str, path: str) -> FileResponse:
        report = ws.run_dir(name) / "report"
        target = ws.inside(report / path)
        if report.resolve() not in [target, *target.parents] or not target.is_file():
            raise WorkspaceError(f"no report file '{path}' in run '{name}'")
        return FileResponse(
            target, media_type=mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        )

    @app.get("/runs/{name}/config.yaml")
    async def run_config(name: str) -> Response:
        path = ws.run_dir(name) / "config.yaml"
        if not path.is_file():
            raise WorkspaceError(f"run '{name}' has no config.yaml")
        return Response(path.read_text(encoding="utf-8"), media_type="text/plain; charset=utf-8")

    # ---- new run ------------------------------------------------------------------------------------
    @app.get("/new", response_class=HTMLResponse)
    async def new_form(request: Request, task: str | None = None, source: str = "") -> HTMLResponse:
        values = _prefill(ws, source)
        task = task if task in TASKS else str(values.get("task") or TASKS[0])
        sections = forms.build_sections(task, values)
        return page(
            request,
            "new.html",
            task=task,
            tasks=TASKS,
            sections=sections,
            source=source,
            sources=_sources(ws),
            run_name="",
            problems=[],
        )

    @app.post("/new", response_class=HTMLResponse)
    async def new_submit(request: Request) -> Response:
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        task = form.get("task") if form.get("task") in TASKS else TASKS[0]
        action = form.get("action", "validate")
        raw, parse_problems = forms.form_to_config(task, form)
        for key, problem in forms.paths_outside(raw, ws.root).items():
            parse_problems.setdefault(key, []).append(problem)
        sections = forms.build_sections(task, raw)
        for f in forms.iter_fields(sections):  # show what was typed, not what was parsed
            f.value = form.get(f.key, f.value)
            f.errors += parse_problems.get(f.key, [])
        cfg, problems = forms.validate(task, raw, sections)
        name_error = _name_problem(form.get("run_name", ""))
        context = {
            "task": task,
            "tasks": TASKS,
            "sections": sections,
            "source": form.get("source", ""),
            "sources": _sources(ws),
            "run_name": form.get("run_name", ""),
            "name_error": name_error,
            "problems": problems,
        }
        valid = cfg is not None and not parse_problems
        if not valid:
            return page(request, "new.html", 422, **context)
        # What was typed; fields left at their defaults stay out (the CLI's validator fills them in).
        text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
        if action == "download":
            return Response(
                text,
                media_type="application/x-yaml",
                headers={
                    "Content-Disposition": f'attachment; filename="{form.get("run_name") or "config"}.yaml"'
                },
            )
        if action == "check":
            context["check_output"] = await run_in_threadpool(_check, ws, raw)
        if action == "start":
            if name_error:
                return page(request, "new.html", 422, **context)
            await run_in_threadpool(launch.start_run, ws, form["run_name"], raw)
            return RedirectResponse(f"/runs/{form['run_name']}", status_code=303)
        return page(request, "new.html", **context, yaml_text=text, valid=True)

    # ---- compare ------------------------------------------------------------------------------------
    @app.get("/compare", response_class=HTMLResponse)
    async def compare(request: Request) -> HTMLResponse:
        names = [check_name(n) for n in request.query_params.getlist("run")]
        runs = await run_in_threadpool(list_runs, ws)
        if len(names) < 2:
            return page(request, "compare.html", runs=runs, chosen=names, result=None)
        result = await run_in_threadpool(compare_runs, ws, names)
        return page(request, "compare.html", runs=runs, chosen=names, result=result)

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

    # ---- registry -----------------------------------------------------------------------------------
    from lorakit.ui import registry_pages

    registry_pages.add_routes(app, ws, page)
    return app


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


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


def _labels(metrics: dict[str, Any] | None) -> list[str]:
    for split in ("test", "validation"):
        m = (metrics or {}).get(split) or {}
        if isinstance(m, dict) and isinstance(m.get("per_class"), dict):
            return list(m["per_class"])
    return []


def _name_problem(name: str) -> str | None:
    try:
        check_name(name)
    except WorkspaceError as exc:
        return str(exc)
    return None


def _sources(ws: Workspace) -> list[tuple[str, str]]:
    """(value, label) of the form's prefill choices: example configs, then existing runs."""
    return [(f"config:{c}", f"example: {c}") for c in ws.example_configs()] + [
        (f"run:{r}", f"run: {r}") for r in ws.run_names() if (ws.runs / r / "config.yaml").is_file()
    ]


def _prefill(ws: Workspace, source: str) -> dict[str, Any]:
    kind, _, name = source.partition(":")
    if kind == "config":
        return read_yaml(ws.inside(ws.configs / check_name(name, "config name")))
    if kind == "run":
        return read_yaml(ws.run_dir(name) / "config.yaml")
    return {}


def _check(ws: Workspace, raw: dict[str, Any]) -> str:
    """What ``lorakit check`` prints for the config (its own process: it loads data and model)."""
    ws.state.mkdir(parents=True, exist_ok=True)
    path = ws.state / f"check-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lorakit", "check", str(path)],
            cwd=ws.root,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return (done.stdout + done.stderr).strip()
    except subprocess.TimeoutExpired:
        return "lorakit check took longer than 10 minutes and was stopped"
    finally:
        path.unlink(missing_ok=True)
