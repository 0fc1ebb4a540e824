"""What the provider refuses before the model sees a request: prompts over the token limit, keys
over their tokens per minute, and work past the request's deadline.

Every check runs on the event loop, never in the model worker's queue: one long prompt once held
the tiny-model server for 106 s, and a refusal that waited behind model work would not protect
anyone. Prompts are counted with a copy of the host's tokenizer (the worker thread uses the
original, and a fast tokenizer is not safe to share across threads); a text longer than the
limit times the longest token in characters is refused without tokenizing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from evomerge.serve.schemas import ApiError

T = TypeVar("T")
WINDOW = 60.0
"""Seconds a key's tokens count against its tokens-per-minute limit."""


class PromptGate:
    """Counts prompt tokens as usage reports them and refuses a prompt over `max_prompt_tokens` (400,
    OpenAI's ``context_length_exceeded``)."""

    def __init__(self, tokenizer: Any, max_prompt_tokens: int) -> None:
        self.limit = max_prompt_tokens
        self._tokenizer = copy.deepcopy(tokenizer.backend_tokenizer)
        vocab = range(tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True))
        self._longest = 1 + max(len(tokenizer.decode([i])) for i in vocab)  # +1: a partial UTF-8 token

    def ids(self, text: str) -> list[int]:
        """Token ids of `text` without added special tokens (what usage and /tokenize report)."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def check(self, texts: list[str], param: str, indexed: bool = False) -> int:
        """The tokens of `texts` in all, after refusing any one over the limit (named ``param[i]``
        when `indexed`, else `param`)."""
        total = 0
        for i, text in enumerate(texts):
            long = len(text) > self.limit * self._longest  # more tokens than the limit whatever they are
            n = 0 if long else len(self.ids(text))
            if long or n > self.limit:
                where = f"{param}[{i}]" if indexed else param
                size = f"{len(text)} characters, over {self.limit} tokens" if long else f"{n} tokens"
                raise ApiError(400, f"{where} is {size}; this provider serves prompts of at most {self.limit} "
                                    "tokens (GET /v1/models states it)", where, code="context_length_exceeded")
            total += n
        return total


@dataclass
class Bill:
    """One request's charge against its key: its worst case until `used` says what it spent."""

    at: float
    used: int


class TokenRate:
    """Tokens per minute per API key, over a sliding minute. A request is charged its worst case
    (prompt plus every token it may generate) while it runs, then what it used, or nothing when it
    was not served; one that would pass the limit gets 429 with Retry-After. Keys are kept as
    SHA-256 digests, never as given."""

    def __init__(self, tokens_per_minute: int | None) -> None:
        self.limit = tokens_per_minute
        self._bills: dict[bytes, deque[Bill]] = {}

    @contextlib.contextmanager
    def charged(self, key: str | None, tokens: int) -> Iterator[Bill]:
        """Charge `tokens` to `key` for the block, which sets ``bill.used``; a block that raises was
        not served and is charged nothing. Raises 429, or 400 for a request no minute can hold."""
        bill = Bill(time.monotonic(), tokens)
        if self.limit is not None:
            self._admit(hashlib.sha256((key or "").encode()).digest(), bill, self.limit)
        try:
            yield bill
        except BaseException:
            bill.used = 0
            raise

    def _admit(self, digest: bytes, bill: Bill, limit: int) -> None:
        if bill.used > limit:
            raise ApiError(400, f"this request may use {bill.used} tokens; this provider allows {limit} "
                                "tokens per minute per key: send fewer or shorter prompts or a lower max_tokens",
                           None, code="request_too_large")
        bills = self._bills.setdefault(digest, deque())
        while bills and bills[0].at <= bill.at - WINDOW:
            bills.popleft()
        spent = sum(b.used for b in bills)
        if spent + bill.used > limit:
            left, wait = spent, 0.0
            for old in bills:  # the oldest charges expire first
                left -= old.used
                wait = old.at + WINDOW - bill.at
                if left + bill.used <= limit:
                    break
            raise ApiError(429, f"over {limit} tokens per minute for this key ({spent} in the last "
                                f"{WINDOW:.0f} s); retry after {math.ceil(wait)} s", None, kind="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))})
        bills.append(bill)


async def within(deadline: float, work: Awaitable[T]) -> T:
    """`work`, or 504 (OpenAI's shape, ``deadline_exceeded``) once `deadline` (time.monotonic) passes."""
    try:
        return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise ApiError(504, "the request ran past this provider's deadline and was stopped; send fewer or "
                            "shorter prompts, or a lower max_tokens", None, kind="server_error",
                       code="deadline_exceeded") from None


def unless_expired(deadline: float, fn: Callable[[Any], T]) -> Callable[[Any], T]:
    """`fn` for the model worker, skipped when its request's deadline passed while it was queued
    (its client already has the 504), so a request past its deadline holds the model no longer."""

    def run(host: Any) -> T:
        if time.monotonic() > deadline:
            raise ApiError(504, "deadline passed in the queue", None, kind="server_error", code="deadline_exceeded")
        return fn(host)

    return run
