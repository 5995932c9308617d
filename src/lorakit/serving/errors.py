"""The server's errors: every one is JSON ``{"error": {"type", "message"}}`` with one line of message, a
4xx code for what the client can fix, 500 only for a server fault (its type named, the rest in the log).

:class:`ApiError` is what routes raise; :func:`user_error` maps lorakit's own exceptions to it;
:func:`install` registers the handlers on an app; :class:`BodyLimit` refuses oversized bodies (413)
before they are read.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.adapters.registry import RegistryError
from lorakit.errors import AdapterError, LorakitError
from lorakit.serving.engine import UnknownAdapter

TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    422: "invalid_request",
    503: "overloaded",
    504: "timeout",
}


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


#: The OpenAPI ``responses`` of a route that can fail with any client error.
RESPONSES: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorResponse} for c in (400, 401, 403, 404, 413, 422, 503, 504)
}


class ApiError(Exception):
    """A request that cannot be answered: its HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": TYPES.get(status, "error"), "message": message}},
        status_code=status,
        headers=headers,
    )


def user_error(exc: Exception) -> ApiError:
    """lorakit's exception as the client's error (an unknown adapter 404, a bad adapter 400, bad input
    422); anything else is re-raised as the server fault it is."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownAdapter):
        return ApiError(404, str(exc))
    if isinstance(exc, LorakitError):
        return ApiError(
            400 if isinstance(exc, AdapterError | RegistryError) else 422, " ".join(str(exc).split())
        )
    raise exc


def install(app: FastAPI) -> None:
    """Register the JSON error handlers on ``app``."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, {"Retry-After": "1"} if exc.status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        return error_response(422, "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:  # a server fault, never bad input
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log")


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes (declared or streamed) with 413."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _send_json(
                send,
                413,
                "request_too_large",
                f"request body over {self.limit} bytes; send fewer or smaller inputs",
            )
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_json(
                send,
                413,
                "request_too_large",
                f"request body over {self.limit} bytes; send fewer or smaller inputs",
            )


class _TooLarge(Exception):
    pass


async def _send_json(send: Any, status: int, kind: str, message: str) -> None:

    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
