"""The new-run page: a form generated from the config schema, validated as the CLI validates, with
check (``lorakit check``), YAML view / download, and start."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from lorakit.tasks import task_names
from lorakit.ui import forms, launch
from lorakit.ui.workspace import Workspace, WorkspaceError, check_name, read_yaml


def add_routes(app: FastAPI, ws: Workspace, page: Any) -> None:
    """Register ``/new`` on ``app``; ``page(request, template, status, **context)`` renders."""

    # ---- new run ------------------------------------------------------------------------------------
    @app.get("/new", response_class=HTMLResponse)
    async def new_form(request: Request, task: str | None = None, source: str = "") -> HTMLResponse:
        values = _prefill(ws, source)
        task = task if task in task_names() else str(values.get("task") or task_names()[0])
        sections = forms.build_sections(task, values)
        return page(
            request,
            "new.html",
            task=task,
            tasks=task_names(),
            sections=sections,
            source=source,
            sources=_sources(ws),
            run_name="",
            problems=[],
        )

    @app.post("/new", response_class=HTMLResponse)
    async def new_submit(request: Request) -> Response:
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        task = form.get("task") if form.get("task") in task_names() else task_names()[0]
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
            "tasks": task_names(),
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
