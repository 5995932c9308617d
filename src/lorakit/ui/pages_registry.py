"""The registry page: published versions, publishing a finished run, model cards, deletion."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from markupsafe import Markup
from pydantic import BaseModel, Field, ValidationError

from lorakit.adapters.registry import Registry, parse_ref
from lorakit.errors import LorakitError
from lorakit.ui.workspace import Workspace, list_runs


class PublishForm(BaseModel):
    """Publish a finished run's adapter under a registry name."""

    run: str = Field(description="Run folder name.")
    name: str = Field(description="Registry name.")


def add_routes(app: FastAPI, ws: Workspace, page: Any) -> None:
    """Register ``/registry`` routes on ``app``; ``page(request, template, status, **context)`` renders."""

    def registry() -> Registry:
        return Registry(ws.registry)

    async def listing(request: Request, status: int = 200, **extra: Any) -> HTMLResponse:
        versions = await run_in_threadpool(registry().list)
        finished = [r.name for r in await run_in_threadpool(list_runs, ws) if r.status == "finished"]
        return page(request, "registry.html", status, versions=versions, finished=finished, **extra)

    @app.get("/registry", response_class=HTMLResponse)
    async def registry_page(request: Request) -> HTMLResponse:
        return await listing(request)

    @app.post("/registry/publish", response_class=HTMLResponse)
    async def publish(request: Request) -> Response:
        form = dict(await request.form())
        try:
            body = PublishForm.model_validate(form)
            run = ws.run_dir(body.run)
            version, new = await run_in_threadpool(registry().publish, run, body.name)
        except (ValidationError, LorakitError) as exc:
            message = (
                "; ".join(e["msg"] for e in exc.errors()) if isinstance(exc, ValidationError) else str(exc)
            )
            return await listing(request, 422, error=message, form=form)
        note = f"published {version.ref}" if new else f"unchanged: already published as {version.ref}"
        return await listing(request, notice=note)

    @app.get("/registry/card", response_class=HTMLResponse)
    async def card(request: Request, ref: str) -> HTMLResponse:
        parse_ref(ref)
        version = await run_in_threadpool(registry().get, ref)
        readme = ws.inside(version.path / "README.md")
        text = readme.read_text(encoding="utf-8") if readme.is_file() else "(this version has no model card)"
        front, html = render_card(text)
        return page(request, "card.html", version=version, card=html, front=front)

    @app.get("/registry/delete", response_class=HTMLResponse)
    async def confirm_delete(request: Request, ref: str) -> HTMLResponse:
        version = await run_in_threadpool(registry().get, ref)
        return page(request, "confirm.html", version=version)

    @app.post("/registry/delete")
    async def delete(request: Request) -> Response:
        form = await request.form()
        ref = str(form.get("ref", ""))
        if form.get("confirm") != "yes":
            return RedirectResponse(f"/registry/delete?ref={ref}", status_code=303)
        gone = await run_in_threadpool(registry().delete, ref)
        return await listing(request, notice="deleted " + ", ".join(v.ref for v in gone))


def render_card(text: str) -> tuple[str, Markup]:
    """A model card (README.md) as HTML: its YAML front matter (the Hub's metadata) apart, its
    Markdown rendered with raw HTML escaped (a card is data, never markup of this page)."""
    from markdown_it import MarkdownIt

    front = ""
    if text.startswith("---\n") and "\n---" in text[4:]:
        front, text = text[4:].split("\n---", 1)
        text = text.lstrip("-").lstrip("\n")
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    return front.strip(), Markup(md.render(text))
