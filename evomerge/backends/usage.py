"""What the api backend's requests spend: token bounds, per-evaluation tallies, and the counting
of answers that lack usage.

A request reserves one query and an upper bound of its tokens on every cap before it is sent
(`reserve_all`); its answer settles that to the provider's usage. An answer without usage is
counted here, never as 0: from the tokens the answer itself lists (echoed logprobs), else by the
provider's unpaid POST /tokenize (`TokenCounter`), else, where the provider has no /tokenize or
it fails, at the request's token bound (each token covers at least one UTF-8 byte, plus the
generation's `max_tokens`): an upper bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge._imports import require
from evomerge.errors import BudgetExhausted
from evomerge.score import Cost
from evomerge.spend import UsageCap

log = logging.getLogger(__name__)

CHAT_TEMPLATE_TOKENS = 128
"""What a chat template may add to one request's tokens (the caps reserve it; usage settles them)."""


def token_bound(texts: Sequence[str], chat: bool = False) -> int:
    """An upper bound of the tokens of `texts` (a token covers at least one UTF-8 byte; 4 for specials,
    `CHAT_TEMPLATE_TOKENS` more per text in a chat template)."""
    return sum(len(t.encode("utf-8")) + 4 + (CHAT_TEMPLATE_TOKENS if chat else 0) for t in texts)


@dataclass
class Tally:
    """What one evaluation spent so far (reported even when it fails), and the `caps` each of its
    requests reserves on: the backend's own and the evaluation's limit."""

    caps: tuple[UsageCap, ...] = ()
    queries: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, tokens: int) -> None:
        """One more query, of `tokens`."""
        self.queries += 1
        self.tokens += tokens

    def cost(self) -> Cost:
        return Cost(self.queries, self.tokens, time.perf_counter() - self.started)


@dataclass(frozen=True)
class Uncounted:
    """What an answer without usage spent, for the provider's /tokenize to count: `sent`, the
    /tokenize bodies of its prompts or conversations (`tokenize_body`); `generated`, the bodies of
    the texts it generated with their finish_reason (``length``: exactly `max_tokens`; else their
    tokens and the stop token); and `known` tokens the answer itself listed (a forced decode's logprobs)."""

    sent: tuple[dict[str, Any], ...]
    generated: tuple[tuple[dict[str, Any], str], ...] = ()
    max_tokens: int = 0
    known: int = 0


def tokenize_body(provider: str, text: str | None = None, messages: list[dict[str, str]] | None = None,
                  generated: bool = False) -> dict[str, Any]:
    """The /tokenize body counting a prompt `text` (``prompt``: vLLM's and `evomerge serve`'s name;
    llama.cpp's ``content``), with the special tokens usage counts for a prompt, none for a
    `generated` text; or a chat request's `messages` (a final assistant message continued, as
    the scoring requests send it)."""
    if messages is not None:
        continued = messages[-1]["role"] == "assistant"
        return {"messages": messages, "add_generation_prompt": not continued, "continue_final_message": continued}
    if provider == "llama.cpp":
        return {"content": text, "add_special": not generated}
    return {"prompt": text, "add_special_tokens": False} if generated else {"prompt": text}


def answer_tokens(resp: Any, fallback: int | Uncounted) -> int | Uncounted:
    """The provider's usage (total tokens), else `fallback`: a count the answer holds, or what to count."""
    usage = resp.get("usage") if isinstance(resp, dict) else getattr(resp, "usage", None)
    if usage is None:
        return fallback
    total = usage.get("total_tokens") if isinstance(usage, dict) else getattr(usage, "total_tokens", None)
    return int(total) if total is not None else fallback


def reserve_all(caps: Sequence[UsageCap], tokens: int) -> None:
    """Reserve one query of `tokens` on every cap, or on none (a refusal releases the others)."""
    for i, cap in enumerate(caps):
        try:
            cap.reserve(Cost(1, tokens))
        except BudgetExhausted:
            for held in caps[:i]:
                held.settle(Cost(1, tokens), None)
            raise


async def settled_all(jobs: Sequence[Awaitable[Any]]) -> list[Any]:
    """Await every job; then raise the first failure. No sibling is cancelled: a request once sent
    is answered and counted, or released, so the caps and the provider's count agree."""
    if len(jobs) == 1:
        return [await jobs[0]]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


class TokenCounter:
    """Counts answers without usage by the provider's POST /tokenize (`tokenize` sends one body)."""

    def __init__(self, tokenize: Callable[[dict[str, Any]], Awaitable[Any]]) -> None:
        self._tokenize_body = tokenize
        self._counts: dict[str, int] = {}  # /tokenize's counts of sent texts (the examples recur)
        self._works: bool | None = None  # whether the provider counts by /tokenize (None: not asked yet)

    async def count(self, spent: Uncounted, bound: int) -> int:
        """The tokens of an answer that lacks usage, by the provider's POST /tokenize (unpaid; vLLM's,
        llama.cpp's and `evomerge serve`'s route) as its usage would count them; `bound`, the
        request's upper bound, where the provider has no /tokenize (404, then never asked again)
        or it fails, and at most that (what was reserved: the caps hold)."""
        if self._works is False:
            return bound
        openai = require("openai", "the api backend")
        stopped = [body for body, finish in spent.generated if finish != "length"]
        try:
            counts = await settled_all([self._tokens_of(b, cache=True) for b in spent.sent]
                                       + [self._tokens_of(b, cache=False) for b in stopped])
        except (openai.APIError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, openai.NotFoundError):
                self._works = False
            log.warning("an answer without usage is counted at its upper bound (%d tokens): POST /tokenize "
                        "failed (%s)", bound, type(exc).__name__)
            return bound
        if self._works is None:
            self._works = True
            log.info("the provider's answers lack usage; counting their tokens by its POST /tokenize")
        sent, generated = counts[:len(spent.sent)], counts[len(spent.sent):]
        at_length = len(spent.generated) - len(stopped)
        return min(bound, sum(sent) + sum(min(spent.max_tokens, n + 1) for n in generated)
                   + at_length * spent.max_tokens + spent.known)

    async def _tokens_of(self, body: dict[str, Any], cache: bool) -> int:
        """/tokenize's count for one body ({"count": n} or {"tokens": [...]}), remembered when `cache`."""
        key = json.dumps(body, sort_keys=True)
        if key not in self._counts:
            answer = await self._tokenize_body(body)
            if not isinstance(answer, dict):
                raise ValueError("POST /tokenize did not answer a JSON object")
            count = int(answer["count"]) if "count" in answer else len(answer["tokens"])
            if not cache:
                return count
            self._counts[key] = count
        return self._counts[key]
