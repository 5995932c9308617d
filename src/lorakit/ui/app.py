"""`lorakit ui`: a FastAPI app factory serving server-rendered pages over one workspace folder.

    /                     runs table (sortable)            /runs/<name>          run page, live (SSE)
    /new                  new-run form (from the schema)   /runs/<name>/try      try the adapter
    /compare?run=a&run=b  differing config keys, metrics, overlaid curves
    /registry             published versions: publish, model card, delete

Each group of pages registers its routes from its own module (``pages_runs``, ``pages_new``,
``pages_try``, ``pages_registry``). All state lives in the workspace (see :mod:`.workspace`); the
app holds only its cache of loaded engines.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

from lorakit.errors import LorakitError
from lorakit.ui import pages_new, pages_registry, pages_runs, pages_try, runqueue
from lorakit.ui.security import Guard
from lorakit.ui.tryit import Playground
from lorakit.ui.workspace import Workspace

HERE = Path(__file__).parent


def help_html(text: str) -> Markup:
    """A help text as HTML: escaped, with its `code` spans as <code> (never raw backticks)."""
    parts = str(escape(text or "")).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: dropped
        parts[-2:] = [parts[-2] + parts[-1]]
    return Markup("".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)))


def create_app(
    workspace: str | Path, *, token: str | None = None, loopback: bool = True, max_runs: int | None = None
) -> FastAPI:
    """The UI over ``workspace``.

    Args:
        workspace: Folder with ``runs/`` (created when missing), ``configs/`` and ``registry/``. Runs
            are started from it; the process should run in it too (``lorakit ui`` changes into it),
            so that relative paths in run configs (a base model, say) name the same files as for train.
        token: Required on every request when set (see :mod:`.security`).
        loopback: The server listens on the loopback interface only (host names are checked).
        max_runs: How many trainings run at once; the others are queued (:mod:`.runqueue`).
            Default: 1 on CPU, one per GPU.

    Returns:
        The ASGI app.
    """
    ws = Workspace(Path(workspace))
    ws.runs.mkdir(parents=True, exist_ok=True)
    playground = Playground()
    slots = max_runs if max_runs is not None else runqueue.default_slots()
    if slots < 1:
        raise LorakitError(f"max_runs: {slots} trainings at once cannot run anything; give 1 or more")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["help"] = help_html
    templates.env.filters["num"] = lambda v, d=4: (
        "" if v is None else f"{v:.{d}f}" if isinstance(v, float) else str(v)
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        pump = runqueue.Pump(ws, slots).start()  # starts queued runs, also those of an earlier UI
        yield
        pump.close()
        playground.close()  # the engines' worker threads

    app = FastAPI(title="lorakit ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, token=token, loopback=loopback)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.state.workspace, app.state.playground, app.state.slots = ws, playground, slots

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

    pages_runs.add_routes(app, ws, page)
    pages_new.add_routes(app, ws, page)
    pages_try.add_routes(app, ws, page, playground)
    pages_registry.add_routes(app, ws, page)
    return app
