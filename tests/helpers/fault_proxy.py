"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1, between the api client and a real provider.

Faults, chosen per request from a script (deterministic tests) and then at random by rate:
``drop`` (close the connection unanswered), ``500``, ``503`` and ``429`` (with ``Retry-After``),
``delay`` (hold the request `delay` seconds, past a client's timeout, then forward it),
``truncate`` (forward, return half the JSON body) and ``corrupt`` (forward, mangle the JSON).
``ok`` forwards untouched. Faults of the provider itself, on every request: `strip` removes
top-level fields from JSON answers (``usage``: a provider that omits it), `blocked` answers 404
for paths it never forwards (``/tokenize``: a provider without the route). `counts` tallies what
was done; `forwarded` counts requests the upstream server received, `routes` the same by
"METHOD /path" ("blocked METHOD /path" for the 404s). Runs its own event loop in a thread, so
sync tests can use it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import threading
from typing import Any

import httpx

FAULTS = ("drop", "500", "503", "429", "delay", "truncate", "corrupt")
_REASONS = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}
_HOP = {"host", "content-length", "connection", "transfer-encoding", "accept-encoding", "keep-alive"}


class FaultProxy:
    """Forward to `upstream` (``http://127.0.0.1:PORT``), injecting faults; use as a context manager."""

    def __init__(self, upstream: str, rates: dict[str, float] | None = None, script: list[str] | None = None,
                 seed: int = 0, delay: float = 2.0, retry_after: float = 0.05, strip: tuple[str, ...] = (),
                 blocked: tuple[str, ...] = ()) -> None:
        unknown = (set(rates or {}) | set(script or ())) - set(FAULTS) - {"ok"}
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; choose from {FAULTS}")
        self.upstream = upstream.rstrip("/").removesuffix("/v1")
        self.rates = dict(rates or {})
        self.script = list(script or ())
        self.delay, self.retry_after = delay, retry_after
        self.strip, self.blocked = strip, blocked
        self.counts: collections.Counter[str] = collections.Counter()
        self.forwarded = 0
        self.routes: collections.Counter[str] = collections.Counter()
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="fault-proxy")
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._client = httpx.AsyncClient(timeout=60)
        self._tasks: set[asyncio.Task[None]] = set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    def _pick(self) -> str:
        if self.script:
            return self.script.pop(0)
        r = self._rng.random()
        for fault, rate in self.rates.items():
            if r < rate:
                return fault
            r -= rate
        return "ok"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = [tuple(h.split(":", 1)) for h in lines[1:] if ":" in h]
                length = next((int(v) for k, v in headers if k.strip().lower() == "content-length"), 0)
                body = await reader.readexactly(length) if length else b""
                if path.split("?", 1)[0] in self.blocked:
                    self.routes[f"blocked {method} {path}"] += 1
                    await self._respond(writer, 404, b'{"detail": "Not Found"}', {})
                    continue
                fault = self._pick()
                self.counts[fault] += 1
                if fault == "drop":
                    break
                if fault in ("500", "503", "429"):
                    status = int(fault)
                    payload = b'{"error": {"message": "injected fault", "type": "server_error"}}'
                    extra = {"retry-after": str(self.retry_after)} if status != 500 else {}
                    await self._respond(writer, status, payload, extra)
                    continue
                if fault == "delay":
                    await asyncio.sleep(self.delay)
                fwd = {k.strip(): v.strip() for k, v in headers if k.strip().lower() not in _HOP}
                resp = await self._client.request(method, self.upstream + path, headers=fwd, content=body)
                self.forwarded += 1
                self.routes[f"{method} {path}"] += 1
                content = self._stripped(resp.content)
                if fault == "truncate":
                    content = content[: len(content) // 2]
                elif fault == "corrupt":
                    content = b"<html>" + content[1:]
                await self._respond(writer, resp.status_code, content, {})
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    def _stripped(self, content: bytes) -> bytes:
        """`content` without the `strip` fields, if it is a JSON object."""
        if not self.strip:
            return content
        try:
            answer = json.loads(content)
        except ValueError:
            return content
        if not isinstance(answer, dict):
            return content
        return json.dumps({k: v for k, v in answer.items() if k not in self.strip}).encode()

    async def _respond(self, writer: asyncio.StreamWriter, status: int, body: bytes, extra: dict[str, str]) -> None:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "content-type: application/json",
                f"content-length: {len(body)}", *(f"{k}: {v}" for k, v in extra.items())]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
