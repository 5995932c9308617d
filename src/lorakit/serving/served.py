"""What every route of the server shares: the engine, its queue bound, the request timeout and the admin
check. A route encodes its request in a worker thread, queues the rows for the engine's batched model and
waits for its outputs here; everything slow or failing is turned into an :class:`ApiError`."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from lorakit.serving.engine import Engine
from lorakit.serving.errors import ApiError, user_error
from lorakit.serving.metrics import Metrics


@dataclass
class Served:
    engine: Engine
    metrics: Metrics
    admin_token: str | None
    request_timeout: float
    max_queue: int

    async def in_thread(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in a worker thread (tokenizers, image decoding, registry reads), lorakit's
        errors as the client's."""
        try:
            return await run_in_threadpool(fn, *args)
        except Exception as exc:
            raise user_error(exc) from None

    async def run(self, adapter: str, encode: Any, options: Any = None) -> list[Any]:
        """Rows from ``encode()`` through the engine for ``adapter``: one output per row.

        Raises:
            ApiError: 503 when the queue is full, 504 past the timeout, 4xx for bad input.
        """
        if self.engine._queue.qsize() >= self.max_queue:
            raise ApiError(503, "the server is busy; retry shortly")
        rows = await self.in_thread(encode)
        try:
            future = self.engine.submit(adapter, rows, options)
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=self.request_timeout)
        except TimeoutError:
            future.cancel()
            raise ApiError(
                504, f"no result within {self.request_timeout:g} s; retry, or send fewer inputs"
            ) from None
        except Exception as exc:
            raise user_error(exc) from None

    def admin(self, request: Request) -> None:
        """Refuse an admin route unless the request carries the server's bearer token.

        Raises:
            ApiError: 403 when admin routes are off, 401 without the right token.
        """
        if self.admin_token is None:
            raise ApiError(
                403, "admin routes are disabled; start the server with --admin-token (or LORAKIT_ADMIN_TOKEN)"
            )
        got = request.headers.get("authorization", "")
        if not got.startswith("Bearer ") or not hmac.compare_digest(
            got[7:].encode(), self.admin_token.encode()
        ):
            raise ApiError(401, "admin route: send the header 'Authorization: Bearer <admin token>'")
