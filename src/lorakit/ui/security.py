"""Who may talk to the UI: it starts processes and reads files, so every request is checked.

- **Token** (required when the UI listens beyond the loopback interface): ``Authorization: Bearer T``,
  or ``?token=T`` once, which sets an HttpOnly, SameSite=Strict cookie for the pages that follow.
- **Host**: on the loopback interface only ``localhost`` / ``127.0.0.1`` / ``[::1]`` host names are
  answered, so a web page cannot reach the UI through a DNS name it rebinds to 127.0.0.1.
- **Cross-site POSTs**: a POST whose ``Origin`` (or, without one, ``Referer``) is another site, or
  that the browser marks ``Sec-Fetch-Site: cross-site``, is refused.
"""

from __future__ import annotations

import hmac
import ipaddress
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

COOKIE = "lorakit_ui_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is the loopback interface."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """``example.org:8000`` -> ``example.org``; ``[::1]:8000`` -> ``::1``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware enforcing the token, the host names and same-origin POSTs.

    Args:
        app: The wrapped ASGI app.
        token: The token every request must carry; None = no token (loopback only).
        loopback: Whether the server listens on the loopback interface only.
    """

    def __init__(self, app: Any, *, token: str | None, loopback: bool) -> None:
        self.app, self.token, self.loopback = app, token, loopback

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.loopback and _host_name(host) not in LOOPBACK_NAMES:
            await _deny(send, 421, "this UI answers only to localhost / 127.0.0.1")
            return
        set_cookie = None
        if self.token:
            given = self._token_from(scope, headers)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                await _deny(
                    send,
                    401,
                    "a token is required: open the UI with ?token=<token> or send Authorization: "
                    "Bearer <token>",
                )
                return
            if COOKIE not in SimpleCookie(headers.get("cookie", "")):
                set_cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and not _same_origin(headers, host):
            await _deny(send, 403, "cross-site request refused: POSTs must come from the UI's own pages")
            return
        if set_cookie is None:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = message | {
                    "headers": [*message.get("headers", []), (b"set-cookie", set_cookie.encode("latin-1"))]
                }
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    @staticmethod
    def _token_from(scope: dict[str, Any], headers: dict[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("token"):
            return query["token"][0]
        cookie = SimpleCookie(headers.get("cookie", ""))
        return cookie[COOKIE].value if COOKIE in cookie else None


def _same_origin(headers: dict[str, str], host: str) -> bool:
    if headers.get("sec-fetch-site") == "cross-site":
        return False
    source = headers.get("origin") or headers.get("referer")
    if not source or source == "null":
        # Browsers send Origin with every cross-site POST; none at all means a non-browser client
        # (which needs the token anyway when one is set). "null" comes from sandboxed or file pages.
        return source is None
    return urlsplit(source).netloc.lower() == host.lower()


async def _deny(send: Any, status: int, message: str) -> None:
    body = f"<!doctype html><title>lorakit ui</title><p>{message}</p>".encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
