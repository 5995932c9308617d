"""Checks of the templates a user writes into a config, at load time (before any model or data is read).

Two kinds: a ``data.chat_template`` is Jinja, rendered by transformers' ``apply_chat_template`` in a
sandbox with ``messages``, ``add_generation_prompt`` and the special tokens; a
``data.instruction_template`` is a Python format string filled from a row's columns
(``'Review: {text}'``). A mistake in either would otherwise surface as a traceback from deep inside
tokenisation, or worse as silently empty training text; here it is one line with its position.
"""

from __future__ import annotations

import string
from typing import Any

#: What transformers hands a chat template (``apply_chat_template``): anything else is undefined.
CHAT_TEMPLATE_NAMES = (
    "messages",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "tools",
    "documents",
    "raise_exception",
    "strftime_now",
)
_SAMPLE = [
    {"role": "system", "content": "SYSTEM-MESSAGE"},
    {"role": "user", "content": "USER-MESSAGE"},
    {"role": "assistant", "content": "ASSISTANT-ANSWER"},
]


def chat_template_problem(template: str, *, key: str = "data.chat_template") -> str | None:
    """What is wrong with a Jinja chat template, in one line with its line number, or None.

    The template is compiled as transformers compiles it and rendered for a sample conversation: a
    syntax error, an error while rendering (an attribute of something undefined, a ``raise_exception``)
    and a template that renders none of the messages (a misspelt ``messages``) are each reported, the
    variables it reads that transformers does not pass named.
    """
    import jinja2
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    try:
        parsed = env.parse(template)
        compiled = env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        reason = str(exc.message).rstrip(".")
        return f"{key}: Jinja syntax error at line {exc.lineno}: {reason}; fix the template or use chatml"
    unknown = sorted(meta.find_undeclared_variables(parsed) - set(CHAT_TEMPLATE_NAMES))
    suspects = f" (it reads {', '.join(unknown)}, which the template is not given)" if unknown else ""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    try:
        text = compiled.render(
            messages=_SAMPLE,
            add_generation_prompt=False,
            bos_token="",
            eos_token="",
            raise_exception=raise_exception,
            strftime_now=lambda fmt: "",
        )
    except Exception as exc:  # the template's own code failed: jinja2 and Python errors alike
        return (
            f"{key}: fails on a system / user / assistant conversation at line {_template_line(exc)}: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())}{suspects}"
        )
    if not all(m["content"] in text for m in _SAMPLE[1:]):
        return (
            f"{key}: renders a user / assistant conversation without its messages{suspects}; the "
            f"template is given {', '.join(CHAT_TEMPLATE_NAMES[:4])}"
        )
    return None


def _template_line(exc: BaseException) -> int | str:
    """The template line of a rendering error (jinja2 maps its frames to ``<template>`` lines)."""
    tb, line = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line if line is not None else "?"


def format_template_problem(template: str, *, key: str = "data.instruction_template") -> str | None:
    """What is wrong with a ``{column}`` format template, in one line with its character position, or
    None: an unmatched brace, a field without a column name, or a bad conversion or format spec."""
    brace = _unmatched_brace(template)
    if brace is not None:
        at, which = brace
        around = template[max(0, at - 12) : at + 12]
        fix = "close it with }" if which == "{" else "write }} for a literal brace"
        return f"{key}: unmatched '{which}' at character {at + 1} (near {around!r}); {fix}"
    try:
        fields = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        return f"{key}: {exc}; write {{column}} for a column's value and {{{{ }}}} for literal braces"
    for name, _, _ in fields:
        if not name or name.isdigit() or not name.isidentifier():
            return (
                f"{key}: the field {{{name}}} names no column; write the column's name, e.g. {{text}} "
                "(a literal brace is {{ or }})"
            )
    try:
        template.format(**{name: "x" for name, _, _ in fields})
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        return f"{key}: {' '.join(str(exc).split())} in a field; a field is {{column}} or {{column!r}}"
    return None


def _unmatched_brace(template: str) -> tuple[int, str] | None:
    """``(index, brace)`` of the first brace with no partner (doubled braces are literal)."""
    i, opened = 0, None
    while i < len(template):
        c = template[i]
        if opened is None and c in "{}" and template[i : i + 2] in ("{{", "}}"):
            i += 2
            continue
        if c == "{":
            if opened is not None:
                return opened, "{"
            opened = i
        elif c == "}":
            if opened is None:
                return i, "}"
            opened = None
        i += 1
    return (opened, "{") if opened is not None else None


def template_validator(check: Any, *, skip: tuple[str, ...] = ()) -> Any:
    """A pydantic ``field_validator`` body running ``check`` on a template value (``skip``: names)."""

    def validate(value: str | None) -> str | None:
        if value is None or value in skip:
            return value
        problem = check(value)
        if problem:
            raise ValueError(problem)
        return value

    return validate
