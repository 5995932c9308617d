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

from lorakit.config.loading import validate_config
from lorakit.errors import ConfigError, LorakitError
from lorakit.tasks import task_names
from lorakit.ui import forms, launch, runqueue, startcheck
from lorakit.ui.workspace import NAME, Workspace, WorkspaceError, check_name, read_yaml


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
            run_name=_suggested_name(ws, source),
            problems=[],
            summary=[],
        )

    @app.post("/new", response_class=HTMLResponse)
    async def new_submit(request: Request) -> Response:
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        action = form.get("action", "validate")
        context, raw = await run_in_threadpool(_read_form, ws, form, action)
        if context["summary"]:
            return page(request, "new.html", 422, **context)
        name = form.get("run_name", "")
        # What was typed (fields left at their defaults stay out: the CLI's validator fills them in),
        # with the output folder the run will have.
        text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
        if action == "download":
            return Response(
                text,
                media_type="application/x-yaml",
                headers={"Content-Disposition": f'attachment; filename="{name or "config"}.yaml"'},
            )
        if action == "start":
            await run_in_threadpool(launch.start_run, ws, name, raw)
            await run_in_threadpool(runqueue.pump, ws, request.app.state.slots)  # now, when a slot is free
            return RedirectResponse(f"/runs/{name}", status_code=303)
        if action == "check":
            context["check_output"], context["check_failed"] = await run_in_threadpool(_check, ws, raw)
        return page(request, "new.html", **context, yaml_text=text, valid=not context.get("check_failed"))

    @app.post("/new/preview", response_class=HTMLResponse)
    async def data_preview(request: Request) -> HTMLResponse:
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        task = form.get("task") if form.get("task") in task_names() else task_names()[0]
        return page(request, "_preview.html", preview=await run_in_threadpool(_preview, ws, task, form))


def _read_form(ws: Workspace, form: dict[str, str], action: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The form's page context with every problem placed (``summary``: all of them, for the top)
    and the raw config (with ``output.dir`` when the name is good)."""
    task = form.get("task") if form.get("task") in task_names() else task_names()[0]
    raw, parse_problems = forms.form_to_config(task, form)
    for key, problem in forms.paths_outside(raw, ws.root).items():
        parse_problems.setdefault(key, []).append(problem)
    sections = forms.build_sections(task, raw)
    by_key = {f.key: f for f in forms.iter_fields(sections)}
    for f in by_key.values():  # show what was typed, not what was parsed
        f.value = form.get(f.key, f.value)
        f.errors += parse_problems.get(f.key, [])
    cfg, unplaced = forms.validate(task, raw, sections)
    cfg = cfg if not parse_problems else None
    name = form.get("run_name", "")
    name_error = _name_problem(name) if (action != "download" or name) else None
    if cfg is not None:  # well formed: what Start would run into (model, data, name taken)
        for key, problem in startcheck.start_problems(ws, cfg, "" if name_error else name).items():
            if key == "run_name":
                name_error = problem
            elif key in by_key:
                by_key[key].errors.append(problem)
            else:
                unplaced.append(problem)
        cfg = None if any(f.errors for f in by_key.values()) else cfg
    if not name_error and name:
        raw["output"] = dict(raw.get("output") or {}) | {"dir": f"runs/{name}"}
    summary = [("run_name", name_error)] if name_error else []
    summary += [(f.key, e) for f in forms.iter_fields(sections) for e in f.errors]
    summary += [("", p) for p in unplaced]
    context = {
        "task": task,
        "tasks": task_names(),
        "sections": sections,
        "source": form.get("source", ""),
        "sources": _sources(ws),
        "run_name": name,
        "name_error": name_error,
        "problems": unplaced,
        "summary": summary,
        "preview": _preview(ws, task, form) if cfg is not None else None,
    }
    return context, raw


def _preview(ws: Workspace, task: str, form: dict[str, str]) -> dict[str, Any]:
    """What the data preview shows for the form's data section (an error line when it cannot)."""
    raw, problems = forms.form_to_config(task, form)
    data_problems = [p for key, ps in problems.items() if key.startswith("data.") for p in ps]
    if data_problems:
        return {"error": data_problems[0]}
    if not (raw.get("data") or {}).get("train"):
        return {"error": "name a data.train file to see its first rows"}
    outside = forms.paths_outside({"data": raw["data"]}, ws.root)
    if outside:
        return {"error": next(iter(outside.values()))}
    # Only the data section matters here: any model name makes the config whole.
    data_only = {"task": task, "data": raw["data"], "model": {"name_or_path": "preview"}}
    try:
        return startcheck.preview(validate_config(data_only, "the form")) or {
            "error": "data.train is a Hub dataset: it is downloaded when the run starts"
        }
    except ConfigError as exc:
        return {"error": "; ".join(p for p in exc.problems if p.startswith("data"))[:400] or str(exc)}
    except LorakitError as exc:
        return {"error": str(exc)}


def _name_problem(name: str) -> str | None:
    try:
        check_name(name)
    except WorkspaceError as exc:
        return str(exc)
    return None


def _suggested_name(ws: Workspace, source: str) -> str:
    """For a form opened from a run (to fix and start again): the first free ``<name>-N``."""
    kind, _, name = source.partition(":")
    if kind != "run" or not NAME.match(name):
        return ""
    return next(f"{name}-{i}" for i in range(2, 10_000) if startcheck.name_taken(ws, f"{name}-{i}") is None)


def _sources(ws: Workspace) -> list[tuple[str, str]]:
    """(value, label) of the form's prefill choices: example configs, then existing runs."""
    return [(f"config:{c}", f"example: {c}") for c in ws.example_configs()] + [
        (f"run:{r}", f"run: {r}")
        for r in ws.run_names()
        if (ws.runs / r / "config.yaml").is_file() or ws.state_file(r, ".yaml").is_file()
    ]


def _prefill(ws: Workspace, source: str) -> dict[str, Any]:
    kind, _, name = source.partition(":")
    if kind == "config":
        return read_yaml(ws.inside(ws.configs / check_name(name, "config name")))
    if kind == "run":  # a run that failed before writing its config.yaml: the one the UI started it with
        written = ws.run_dir(name) / "config.yaml"
        return read_yaml(written if written.is_file() else ws.state_file(name, ".yaml"))
    return {}


def _check(ws: Workspace, raw: dict[str, Any]) -> tuple[str, bool]:
    """What ``lorakit check`` prints for the config (its own process: it loads data and model), and
    whether it failed (then only its error line: a traceback is nothing a form user can act on)."""
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
        text = (done.stdout + done.stderr).strip()
        if done.returncode == 0:
            return text, False
        lines = [line for line in text.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        return (errors or lines[-1:] or [f"error: lorakit check ended with exit code {done.returncode}"])[
            -1
        ], True
    except subprocess.TimeoutExpired:
        return "error: lorakit check took longer than 10 minutes and was stopped", True
    finally:
        path.unlink(missing_ok=True)
