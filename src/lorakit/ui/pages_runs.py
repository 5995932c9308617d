"""Pages of runs: the runs table, a run's live page (server-sent events), stop / resume, its
report files and config, and the comparison of runs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import mimetypes
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse

from lorakit.adapters.folder import read_metadata
from lorakit.data.labels import LabelSpace
from lorakit.errors import LorakitError
from lorakit.tasks import get_task, task_names
from lorakit.tasks.base import ReportSection
from lorakit.ui import launch, runqueue
from lorakit.ui.compare import compare_runs
from lorakit.ui.progress import read_progress, signature
from lorakit.ui.workspace import (
    RunInfo,
    Workspace,
    WorkspaceError,
    check_name,
    has_checkpoint,
    list_runs,
    read_json,
    read_run,
    run_status,
)

SORT_KEYS = {"name", "task", "base_model", "status", "best_value", "test_value", "seconds", "started"}
POLL_SECONDS = 0.5  # how often an open run page's stream looks at the run folder (a few stat calls)


def add_routes(app: FastAPI, ws: Workspace, page: Any) -> None:
    """Register the runs pages on ``app``; ``page(request, template, status, **context)`` renders."""
    _runs_pages(app, ws, page)
    _live_progress(app, ws)
    _run_actions_and_files(app, ws, page)
    _compare_page(app, ws, page)


def _runs_pages(app: FastAPI, ws: Workspace, page: Any) -> None:
    """The runs table, and a run's page (its metrics drawn as its task's report sections)."""

    @app.get("/", response_class=HTMLResponse)
    async def runs_page(request: Request, sort: str = "started", desc: int = 1) -> HTMLResponse:
        key = sort if sort in SORT_KEYS else "started"
        runs = await run_in_threadpool(list_runs, ws)
        present = [r for r in runs if getattr(r, key) is not None]
        present.sort(key=lambda r: getattr(r, key), reverse=bool(desc))
        rows = present + [r for r in runs if getattr(r, key) is None]
        line = runqueue.queued(ws)
        places = {n: i + 1 for i, n in enumerate(line)}
        deleted = request.query_params.get("deleted")
        return page(
            request, "runs.html", runs=rows, sort=key, desc=bool(desc), places=places, deleted=deleted
        )

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
        sections = await run_in_threadpool(_sections, info)
        return page(
            request,
            "run.html",
            run=info,
            queue_place=runqueue.place(ws, name),
            resumable=has_checkpoint(info.path),
            stopped_at=_stopped_at(info, progress),
            stopping=info.status == "running" and bool(info.ui.get("stop_requested")),
            progress=progress,
            console=console,
            sections=sections,
            report=(info.path / "report" / "index.html").is_file(),
            adapter=(info.path / "adapter").is_dir(),
        )


def _live_progress(app: FastAPI, ws: Workspace) -> None:
    """A run's progress as server-sent events, while it runs."""

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
                    if status not in ("running", "queued"):
                        yield "event: end\ndata: {}\n\n"
                        return
                elif quiet > 15:  # a comment line keeps proxies from closing the stream
                    yield ": ping\n\n"
                    quiet = 0.0
                await asyncio.sleep(POLL_SECONDS)
                quiet += POLL_SECONDS

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def _run_actions_and_files(app: FastAPI, ws: Workspace, page: Any) -> None:
    """Stop, resume and delete a run; its report files and config."""

    @app.post("/runs/{name}/stop")
    async def stop(name: str) -> RedirectResponse:
        launch.stop_run(ws, name)  # a queued run leaves the queue
        return RedirectResponse(f"/runs/{name}", status_code=303)

    @app.post("/runs/{name}/resume")
    async def resume(request: Request, name: str) -> RedirectResponse:
        await run_in_threadpool(launch.resume_run, ws, name)
        await run_in_threadpool(runqueue.pump, ws, request.app.state.slots)
        return RedirectResponse(f"/runs/{name}", status_code=303)

    @app.get("/runs/{name}/delete", response_class=HTMLResponse)
    async def confirm_delete(request: Request, name: str) -> HTMLResponse:
        info = await run_in_threadpool(read_run, ws, name)
        return page(request, "confirm_run.html", run=info)

    @app.post("/runs/{name}/delete")
    async def delete(request: Request, name: str) -> RedirectResponse:
        form = await request.form()
        if form.get("confirm") != "yes":
            raise WorkspaceError(
                f"deleting run '{name}' needs confirming (the button on /runs/{name}/delete)"
            )
        await run_in_threadpool(launch.delete_run, ws, name)
        return RedirectResponse(f"/?deleted={name}", status_code=303)

    @app.get("/runs/{name}/report/{path:path}")
    async def report_file(name: str, path: str) -> FileResponse:
        report = ws.run_dir(name) / "report"
        target = ws.inside(report / path)
        if report.resolve() not in [target, *target.parents] or not target.is_file():
            raise WorkspaceError(f"no report file '{path}' in run '{name}'")
        return FileResponse(
            target, media_type=mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        )

    @app.get("/runs/{name}/thumb")
    async def thumbnail(name: str, ref: str) -> Response:
        """A small PNG of an image the run's metrics name (a mistake's example): only those, so a
        request cannot read any other file."""
        info = await run_in_threadpool(read_run, ws, name)
        named = {
            str(m.get("image"))
            for split in ("validation", "test")
            for m in ((info.metrics or {}).get(split) or {}).get("mistakes") or []
            if isinstance(m, dict) and m.get("image")
        }
        if ref not in named:
            raise WorkspaceError(f"run '{name}' shows no image '{ref[:80]}'")
        return Response(await run_in_threadpool(_thumbnail, ref), media_type="image/png")

    @app.get("/runs/{name}/config.yaml")
    async def run_config(name: str) -> Response:
        path = ws.run_dir(name) / "config.yaml"
        if not path.is_file():
            raise WorkspaceError(f"run '{name}' has no config.yaml")
        return Response(path.read_text(encoding="utf-8"), media_type="text/plain; charset=utf-8")


def _compare_page(app: FastAPI, ws: Workspace, page: Any) -> None:
    """Two or more runs side by side."""

    @app.get("/compare", response_class=HTMLResponse)
    async def compare(request: Request) -> HTMLResponse:
        names = [check_name(n) for n in request.query_params.getlist("run")]
        runs = await run_in_threadpool(list_runs, ws)
        if len(names) < 2:
            return page(request, "compare.html", runs=runs, chosen=names, result=None)
        result = await run_in_threadpool(compare_runs, ws, names)
        return page(request, "compare.html", runs=runs, chosen=names, result=result)


def _thumbnail(ref: str, size: int = 96) -> bytes:
    from PIL import Image

    try:
        with Image.open(ref) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "PNG")
    except (OSError, ValueError) as exc:
        raise WorkspaceError(f"image '{ref[:80]}' cannot be read: {exc}") from None
    return buf.getvalue()


def _stopped_at(info: RunInfo, progress: dict[str, Any]) -> int | None:
    """The step a run the user stopped stopped at (its newest checkpoint), None when not stopped."""
    if info.status != "interrupted" or not (info.ui.get("stop_requested") or info.ui.get("exit_code") == 130):
        return None
    steps = [int(p.name.removeprefix("step-")) for p in (info.path / "checkpoints").glob("step-*")]
    return max(steps, default=progress.get("step") or 0)


def _sections(info: RunInfo) -> list[ReportSection]:
    """What the run's task shows of its validation and test metrics (as in its HTML report)."""
    if info.task not in task_names() or not info.metrics:
        return []
    meta: dict[str, Any] = {}
    with contextlib.suppress(LorakitError, OSError, ValueError):
        meta = read_metadata(info.path / "adapter")
    space = LabelSpace.from_dict(meta["label_space"]) if meta.get("label_space") else None
    task = get_task(info.task)
    return [
        section
        for split in ("validation", "test")
        for section in task.report_sections(split, info.metrics.get(split) or {}, space)
    ]
