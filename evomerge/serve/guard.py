"""ASGI guard in front of every route: bearer-token auth (401) and the body-size limit (413).

It runs before any body is parsed, so an oversized or unauthenticated request costs the server
almost nothing. The key is compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def send_error(send: Send, status: int, message: str, kind: str, code: str | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Wraps an ASGI app: checks `Authorization: Bearer <key>` and caps request bodies."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None
        self._max = max_body_bytes

    def __repr__(self) -> str:
        return f"Guard(auth={'on' if self._key else 'off'}, max_body_bytes={self._max})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self._key is not None:
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self._key):
                await send_error(send, 401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                                 "authentication_error", "invalid_api_key")
                return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self._max):
            await send_error(send, 413, f"request body over {self._max} bytes; send fewer or shorter examples",
                             "invalid_request_error", "body_too_large")
            return
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            replay = await self._buffered(receive, send)
            if replay is None:
                return
            receive = replay
        await self.app(scope, receive, send)

    async def _buffered(self, receive: Receive, send: Send) -> Receive | None:
        """Read a body of unknown length (chunked) up to the cap, then replay it to the app."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self._max:
                await send_error(send, 413, f"request body over {self._max} bytes", "invalid_request_error",
                                 "body_too_large")
                return None
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay
