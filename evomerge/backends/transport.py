"""How the api backend talks to its provider: the `openai` async client on one background event
loop, at most ``concurrency`` requests in flight, retries with exponential backoff and jitter on
429/5xx/connection errors and garbled answers (honouring ``Retry-After``), every paid request
reserved on the caps before it is sent (`evomerge.backends.usage`), and one-line error messages.

A query is a request the provider answered usably, or one it may have served without a usable
answer (timed out, garbled: counted at its token bound). Its tokens are the provider's usage.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from evomerge._imports import require
from evomerge.backends import llamacpp
from evomerge.backends.usage import Tally, TokenCounter, Uncounted, reserve_all
from evomerge.errors import BackendError
from evomerge.score import Cost

RETRIES = 5
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})

Parse = Callable[[Any], tuple[Any, int | Uncounted]]
"""An answer -> (its value, its tokens or what to count them from); raises ValueError when garbled."""


class _Retryable(Exception):
    """A transient failure: retried after a delay (the provider's Retry-After when it gave one)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Transport:
    """One provider connection: its event loop thread, client, concurrency slots and retry policy."""

    def __init__(self, api_base: str, key: str | None, concurrency: int, timeout: float, retries: int,
                 backoff: float, max_backoff: float) -> None:
        self.api_base = api_base
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.attempts = self.in_flight = self.max_in_flight = 0
        self.counter = TokenCounter(lambda body: self.client.post(
            llamacpp.server_root(api_base) + "/tokenize", body=body, cast_to=object))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="evomerge-api-client", daemon=True)
        self._thread.start()
        self.client, self._sem = self.run(self._open(key, concurrency, timeout))

    async def _open(self, key: str | None, concurrency: int, timeout: float) -> tuple[Any, asyncio.Semaphore]:
        openai = require("openai", "the api backend")
        client = openai.AsyncOpenAI(base_url=self.api_base, api_key=key or "no-key", max_retries=0, timeout=timeout)
        return client, asyncio.Semaphore(concurrency)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run `coro` on the client's loop and wait for it (from any thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_running():
            self.run(self.client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        """The openai client's raw post: the request completions.create(extra_body=...) would send,
        answered as a dict, which skips building typed models (a third of the client's time per query)."""
        return await self.client.post(path, body=body, cast_to=object)

    async def get(self, path: str) -> Any:
        return await self.client.get(path, cast_to=object)

    async def request(self, send: Callable[[], Awaitable[Any]], parse: Parse, token_bound: int,
                      tally: Tally) -> Any:
        """Send until answered: reserve one query of `token_bound` on every cap of `tally`, hold a
        concurrency slot, retry transient failures; an answer without usage is counted
        (`TokenCounter`) before its reservation settles, and what was spent is added to `tally`."""
        openai = require("openai", "the api backend")
        retries, caps = self.retries, tally.caps
        for attempt in range(retries + 1):
            reserve_all(caps, token_bound)
            used: int | None = None
            try:
                async with self._sem:
                    self.attempts += 1
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    try:
                        value, spent = parse(await send())
                    finally:
                        self.in_flight -= 1
                used = spent if isinstance(spent, int) else await self.counter.count(spent, token_bound)
                tally.add(used)
                return value
            except openai.APIStatusError as exc:
                if exc.status_code not in RETRY_STATUS:
                    raise BackendError(f"provider answered {exc.status_code}: {message(exc)}") from None
                failure = _Retryable(f"provider answered {exc.status_code}: {message(exc)}",
                                     _retry_after(exc.response.headers))
            except (openai.APIConnectionError, openai.APIResponseValidationError, ValueError) as exc:
                failure = _Retryable(f"{type(exc).__name__}: {exc}")
                if _maybe_served(openai, exc):  # the provider may have done (and billed) the work
                    used = token_bound
                    tally.add(used)
            finally:
                for cap in caps:
                    cap.settle(Cost(1, token_bound), None if used is None else Cost(1, used))
            if attempt == retries:
                raise BackendError(f"gave up after {retries + 1} attempts; last: {failure}")
            await asyncio.sleep(min(self.max_backoff, failure.retry_after) if failure.retry_after is not None
                                else self._backoff(attempt))
        raise BackendError("unreachable")  # the loop returns or raises

    async def unpaid_get(self, path: str) -> Any:
        """GET an unpaid route (the model list): retried on transient failures and garbled answers,
        outside the caps (the provider does not count it), at least `RETRIES` times: it costs nothing,
        and a start-up that fails on one is a run that never starts."""
        openai = require("openai", "the api backend")
        retries = max(self.retries, RETRIES)
        for attempt in range(retries + 1):
            try:
                answer = await self.get(path)
                if isinstance(answer, dict):
                    return answer
                if attempt == retries:
                    raise BackendError(f"GET {path} answered {type(answer).__name__}, not a JSON object")
            except openai.APIStatusError as exc:
                if exc.status_code not in RETRY_STATUS or attempt == retries:
                    raise
            except (openai.APIConnectionError, ValueError):
                if attempt == retries:
                    raise
            await asyncio.sleep(self._backoff(attempt))
        raise BackendError("unreachable")  # the loop returns or raises

    def _backoff(self, attempt: int) -> float:
        """Seconds before retry `attempt` + 1: exponential, capped, with jitter."""
        return min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)


def json_object(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap `parse` so an answer that is not a JSON object (truncated, HTML) is a retryable ValueError."""

    def checked(resp: Any) -> Any:
        if not isinstance(resp, dict):
            raise ValueError(f"the provider answered {type(resp).__name__}, not a JSON object")
        try:
            return parse(resp)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"the provider's answer is malformed ({type(exc).__name__}: {exc})") from None

    return checked


def message(exc: Any) -> str:
    """The provider's error message of a failed request (its JSON ``error.message`` where it sent one)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(exc, "message", exc))[:300]


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _maybe_served(openai: Any, exc: Exception) -> bool:
    """Whether a failed request may still have been served: it timed out, or its answer arrived
    garbled. Such a request counts as a query (at its token bound), so a cap also bounds what the
    provider served; a refused or dropped connection, or an error status, was not served."""
    return isinstance(exc, openai.APITimeoutError) or not isinstance(exc, openai.APIConnectionError)
