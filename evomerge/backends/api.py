"""`--backend api`: score recipes through an OpenAI-compatible provider that merges server-side.

The user's optimizer sees only answers. Two modes:
- ``logprobs`` (default): send ``prompt + answer`` with ``echo`` and ``logprobs``, ``max_tokens`` 0,
  and the recipe as ``merge`` in the body; score the answer tokens here, so labels stay on the client.
- ``session``: upload the examples once to the provider's merge session and get the loss back
  (the paper's protocol: labels go to the provider). Plain prompts only: the session API has no
  chat-template step, so ``chat`` with this mode is refused.
Both follow `evomerge.serve.protocol`'s rule for the scored tokens, as the local backend does.
``provider`` picks the server's profile: ``evomerge`` (the reference provider, full recipes in
``merge``) or ``llama.cpp`` (adapter scales in ``lora``, β only: `evomerge.backends.llamacpp`);
``auto`` asks the server which it is.
With ``chat`` (``task.chat``) every request goes to /chat/completions, one example each: answers
are scored as a final assistant message (``echo`` + ``continue_final_message``, vLLM's
extensions) and generated after the user turn.
Requests run on one background event loop with the `openai` async client: at most ``concurrency``
in flight, retries with exponential backoff and jitter on 429/5xx/connection errors (honouring
``Retry-After``), and a `UsageCap` reserved before every request, so a query or token cap is never
exceeded: the backend's own (`caps`, for direct use) and the evaluation's `limit` (what the search's
ledger reserved for it, `evomerge.scheduler.ledger`). A query is a request the provider answered
usably, or one it may have served without a usable answer (timed out, garbled: counted at its
token bound). Its tokens are the provider's usage. An answer without usage is counted by the
client, never as 0: from the tokens the answer itself lists (echoed logprobs), else by the
provider's unpaid POST /tokenize (`_Uncounted`), else, where the provider has no /tokenize or it
fails, at the request's token bound (each token covers at least one UTF-8 byte, plus the
generation's `max_tokens`): an upper bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

from evomerge._imports import require
from evomerge.backends import llamacpp
from evomerge.backends._base import Backend, Evaluator, Prepared, Weights, register_backend
from evomerge.backends._config import generation_budget, repository_dir, select_experts, splits_digest
from evomerge.backends.memo import ExampleMemo
from evomerge.errors import BackendError, BudgetExhausted, ConfigError
from evomerge.objectives import Objective
from evomerge.recipe import MergeRecipe
from evomerge.score import Cost, Score
from evomerge.serve.protocol import (MERGE_FIELD, all_greedy, answer_greedy, answer_nll, chat_messages,
                                     generation_prompt, mean_nll)
from evomerge.tasks import Example, Splits, generation_length, load_splits

if TYPE_CHECKING:
    from evomerge.config import SearchConfig

log = logging.getLogger(__name__)

MODES = ("logprobs", "session")
BATCH_SIZE = 16
RETRIES = 5
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
CHAT_TEMPLATE_TOKENS = 128
"""What a chat template may add to one request's tokens (the caps reserve it; usage settles them)."""


class UsageCap:
    """Query and token caps shared by every evaluation (and thread) that holds this object.

    A request reserves one query and an upper bound of its tokens before it is sent; the answer
    settles the reservation to the provider's usage, a failure releases it. Reserving what would
    pass a cap raises `BudgetExhausted`, so settled totals never exceed the caps.
    """

    def __init__(self, max_queries: int | None = None, max_tokens: int | None = None) -> None:
        self.max_queries, self.max_tokens = max_queries, max_tokens
        self.queries = self.tokens = 0
        self._held_queries = self._held_tokens = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def exhausted(self) -> bool:
        """True once no further query may be sent (the scheduler stops asking for candidates)."""
        with self._lock:
            return self.max_queries is not None and self.queries + self._held_queries >= self.max_queries

    def fits(self, queries: int, tokens: int) -> bool:
        """Whether `queries` more queries of `tokens` tokens in all fit now (checked before starting)."""
        with self._lock:
            return ((self.max_queries is None or self.queries + self._held_queries + queries <= self.max_queries)
                    and (self.max_tokens is None or self.tokens + self._held_tokens + tokens <= self.max_tokens))

    def reserve(self, tokens: int) -> None:
        with self._lock:
            if self.max_queries is not None and self.queries + self._held_queries + 1 > self.max_queries:
                raise BudgetExhausted(f"the query cap ({self.max_queries}) is reached; raise --max-queries to go on")
            if self.max_tokens is not None and self.tokens + self._held_tokens + tokens > self.max_tokens:
                raise BudgetExhausted(f"the token cap ({self.max_tokens}) would be passed by a {tokens}-token "
                                      "request; raise --max-tokens to go on")
            self._held_queries += 1
            self._held_tokens += tokens

    def settle(self, reserved: int, used: int | None) -> None:
        """Turn a reservation into spending (`used` tokens), or release it (`used` None: no answer)."""
        with self._lock:
            self._held_queries -= 1
            self._held_tokens -= reserved
            if used is not None:
                self.queries += 1
                self.tokens += used


@dataclass
class _Tally:
    """What one evaluation spent so far (reported even when it fails), within its own `cap`."""

    queries: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    cap: UsageCap | None = None

    def cost(self) -> Cost:
        return Cost(self.queries, self.tokens, time.perf_counter() - self.started)


@dataclass(frozen=True)
class _Uncounted:
    """What an answer without usage spent, for the provider's /tokenize to count: `sent`, the
    /tokenize bodies of its prompts or conversations (`ApiBackend._sent`); `generated` texts with
    their finish_reason (``length``: exactly `max_tokens`; else their tokens and the stop token);
    and `known` tokens the answer itself listed (a forced decode's logprobs)."""

    sent: tuple[dict[str, Any], ...]
    generated: tuple[tuple[str, str], ...] = ()
    max_tokens: int = 0
    known: int = 0


class _Retryable(Exception):
    """A transient failure: retried after a delay (the provider's Retry-After when it gave one)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _token_bound(texts: Sequence[str], chat: bool = False) -> int:
    """An upper bound of the tokens of `texts` (a token covers at least one UTF-8 byte; 4 for specials,
    `CHAT_TEMPLATE_TOKENS` more per text in a chat template)."""
    return sum(len(t.encode("utf-8")) + 4 + (CHAT_TEMPLATE_TOKENS if chat else 0) for t in texts)


def request_plan(objective: Objective, examples: Sequence[Example], per_request: int, chat: bool, length: int,
                 mode: str, provider: str = "evomerge") -> Cost:
    """The queries and a token bound of one scoring pass over `examples`, no retry counted: what
    `ApiBackend` sends for them (the session mode: open the session, evaluate in it; llama.cpp:
    each scored answer decoded once more, `llamacpp.forced_fields`)."""
    if mode == "session":
        return Cost(2, _token_bound([e.prompt + e.answer for e in examples]))
    wanted = objective.metrics
    texts = [(e.prompt, e.answer) for e in examples] if "ce" in wanted or "greedy_match" in wanted else []
    choices = [(e.prompt, c) for e in examples for c in e.choices or ()] if "accuracy" in wanted else []
    prompts = [e.prompt for e in examples] if objective.needs_generation else []
    queries = sum(-(-len(group) // per_request) for group in (texts, choices, prompts))
    scored = texts + choices
    forced = sum(llamacpp.forced_fields(p, a)["max_tokens"] for p, a in scored) if provider == "llama.cpp" else 0
    return Cost(queries, _token_bound([p + a for p, a in scored] + prompts, chat) + len(prompts) * length + forced)


class ApiBackend(Backend):
    """Scores recipes by querying an OpenAI-compatible provider that applies them server-side."""

    def __init__(self, api_base: str, api_key: str | None = None, api_key_env: str = "EVOMERGE_API_KEY",
                 model: str | None = None, mode: str = "logprobs", concurrency: int = 8, timeout: float = 60.0,
                 retries: int = RETRIES, backoff: float = 0.5, max_backoff: float = 30.0, batch_size: int = BATCH_SIZE,
                 caps: UsageCap | None = None, objective: Objective | None = None, max_new_tokens: int | None = None,
                 chat: bool = False, provider: str = "evomerge") -> None:
        llamacpp.check_provider(provider)
        if mode not in MODES:
            raise ConfigError(f"api mode {mode!r} is unknown; choose one of {', '.join(MODES)}")
        if concurrency < 1 or batch_size < 1 or retries < 0:
            raise ConfigError("concurrency and batch_size must be ≥ 1 and retries ≥ 0")
        self.api_base = api_base.rstrip("/")
        self._key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.api_key_env, self.model, self.mode = api_key_env, model, mode
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries
        self.backoff, self.max_backoff, self.batch_size = backoff, max_backoff, batch_size
        self.caps = caps if caps is not None else UsageCap()
        self.objective = objective or Objective()
        self.max_new_tokens, self.chat = max_new_tokens, chat
        if mode == "session" and (self.objective.metrics != ("ce",) or self.objective.needs_references):
            raise ConfigError("the session mode scores cross-entropy only; use objective metric 'ce' with the "
                              "mean or worst aggregate, or the logprobs mode")
        if mode == "session" and chat:
            raise ConfigError("the session mode scores plain prompts (it has no chat template step); "
                              "set task.chat to false or use the logprobs mode")
        self._per_request = 1 if chat else batch_size  # a chat request holds one conversation
        self.provider = "auto"  # until `_use` settles it (for "auto": once the server is asked)
        self._lora_ids: dict[str, int] | None = None
        if provider != "auto":
            self._use(provider)
        self._references: dict[tuple[str, ...], Objective] = {}
        self._token_counts: dict[str, int] = {}  # /tokenize's counts of sent texts (the examples recur)
        self._tokenize: bool | None = None  # whether the provider counts by /tokenize (None: not asked yet)
        self.memo = ExampleMemo()
        self.attempts = self.in_flight = self.max_in_flight = 0
        self._sessions: dict[tuple[Any, ...], tuple[str, int]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="evomerge-api-client", daemon=True)
        self._thread.start()
        self._client, self._sem = self._run(self._open())

    def __repr__(self) -> str:
        return f"ApiBackend(api_base={self.api_base!r}, mode={self.mode!r}, concurrency={self.concurrency})"

    def _use(self, provider: str) -> None:
        """Settle the provider profile; llama.cpp's takes one prompt per request (its usage of a
        many-prompt request counts the first prompt only) and has no chat or session scoring here."""
        if provider == "llama.cpp" and (self.mode == "session" or self.chat):
            raise ConfigError("through llama.cpp the api backend scores plain prompts in the logprobs mode; "
                              "set task.chat to false and api.mode to logprobs")
        self.provider = provider
        if provider == "llama.cpp":
            self._per_request = 1

    async def _profile(self) -> str:
        """The provider profile, asking the server once when it is "auto" (llama.cpp answers GET /props)."""
        if self.provider == "auto":
            openai = require("openai", "the api backend")
            try:
                props = await self._client.get(llamacpp.server_root(self.api_base) + "/props", cast_to=object)
            except (openai.APIError, ValueError):  # the reference provider has no /props (404): not llama.cpp
                props = None
            self._use("llama.cpp" if llamacpp.is_llamacpp(props) else "evomerge")
        return self.provider

    async def _adapters(self) -> dict[str, int]:
        """llama.cpp's adapter ids by expert name (GET /lora-adapters, once)."""
        if self._lora_ids is None:
            listing = await self._client.get(llamacpp.server_root(self.api_base) + "/lora-adapters", cast_to=object)
            self._lora_ids = llamacpp.adapter_ids(listing)
        return self._lora_ids

    async def _open(self) -> tuple[Any, asyncio.Semaphore]:
        openai = require("openai", "the api backend")
        client = openai.AsyncOpenAI(base_url=self.api_base, api_key=self._key or "no-key", max_retries=0,
                                    timeout=self.timeout)
        return client, asyncio.Semaphore(self.concurrency)

    def _run(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    # -- one request, with caps, concurrency and retries -----------------------------------------------

    async def _request(self, send: Callable[[], Awaitable[Any]],
                       parse: Callable[[Any], tuple[Any, int | _Uncounted]], token_bound: int,
                       tally: _Tally | None) -> Any:
        """Send until answered: reserve the cap, hold a concurrency slot, retry transient failures;
        an answer without usage is counted (`_count`) before its reservation settles."""
        openai = require("openai", "the api backend")
        retries = self.retries
        caps = [self.caps] + ([tally.cap] if tally is not None and tally.cap is not None else [])
        for attempt in range(retries + 1):
            _reserve(caps, token_bound)
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
                used = spent if isinstance(spent, int) else await self._count(spent, token_bound)
                if tally is not None:
                    tally.queries += 1
                    tally.tokens += used
                return value
            except openai.APIStatusError as exc:
                if exc.status_code not in RETRY_STATUS:
                    raise BackendError(f"provider answered {exc.status_code}: {_message(exc)}") from None
                failure = _Retryable(f"provider answered {exc.status_code}: {_message(exc)}",
                                     _retry_after(exc.response.headers))
            except (openai.APIConnectionError, openai.APIResponseValidationError, ValueError) as exc:
                failure = _Retryable(f"{type(exc).__name__}: {exc}")
                if _maybe_served(openai, exc):  # the provider may have done (and billed) the work
                    used = token_bound
                    if tally is not None:
                        tally.queries += 1
                        tally.tokens += used
            finally:
                for cap in caps:
                    cap.settle(token_bound, used)
            if attempt == retries:
                raise BackendError(f"gave up after {retries + 1} attempts; last: {failure}")
            await asyncio.sleep(min(self.max_backoff, failure.retry_after) if failure.retry_after is not None
                                else self._backoff(attempt))
        raise BackendError("unreachable")  # the loop returns or raises

    def _sent(self, text: str | None = None, messages: list[dict[str, str]] | None = None,
              generated: bool = False) -> dict[str, Any]:
        """The /tokenize body counting a prompt `text` (``prompt``: vLLM's and `evomerge serve`'s name;
        llama.cpp's ``content``), with the special tokens usage counts for a prompt, none for a
        `generated` text; or a chat request's `messages` (a final assistant message continued, as
        the scoring requests send it)."""
        if messages is not None:
            continued = messages[-1]["role"] == "assistant"
            return {"messages": messages, "add_generation_prompt": not continued, "continue_final_message": continued}
        if self.provider == "llama.cpp":
            return {"content": text, "add_special": not generated}
        return {"prompt": text, "add_special_tokens": False} if generated else {"prompt": text}

    async def _count(self, spent: _Uncounted, bound: int) -> int:
        """The tokens of an answer that lacks usage, by the provider's POST /tokenize (unpaid; vLLM's,
        llama.cpp's and `evomerge serve`'s route) as its usage would count them; `bound`, the
        request's upper bound, where the provider has no /tokenize (404, then never asked again)
        or it fails, and at most that (what was reserved: the caps hold)."""
        if self._tokenize is False:
            return bound
        openai = require("openai", "the api backend")
        stopped = [self._sent(t, generated=True) for t, finish in spent.generated if finish != "length"]
        try:
            counts = await _all([self._tokens_of(b, cache=True) for b in spent.sent]
                                + [self._tokens_of(b, cache=False) for b in stopped])
        except (openai.APIError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, openai.NotFoundError):
                self._tokenize = False
            log.warning("an answer without usage is counted at its upper bound (%d tokens): POST /tokenize "
                        "failed (%s)", bound, type(exc).__name__)
            return bound
        if self._tokenize is None:
            self._tokenize = True
            log.info("the provider's answers lack usage; counting their tokens by its POST /tokenize")
        sent, generated = counts[:len(spent.sent)], counts[len(spent.sent):]
        at_length = len(spent.generated) - len(stopped)
        return min(bound, sum(sent) + sum(min(spent.max_tokens, n + 1) for n in generated)
                   + at_length * spent.max_tokens + spent.known)

    async def _tokens_of(self, body: dict[str, Any], cache: bool) -> int:
        """/tokenize's count for one body ({"count": n} or {"tokens": [...]}), remembered when `cache`."""
        key = json.dumps(body, sort_keys=True)
        if key not in self._token_counts:
            answer = await self._client.post(llamacpp.server_root(self.api_base) + "/tokenize", body=body,
                                             cast_to=object)
            if not isinstance(answer, dict):
                raise ValueError("POST /tokenize did not answer a JSON object")
            count = int(answer["count"]) if "count" in answer else len(answer["tokens"])
            if not cache:
                return count
            self._token_counts[key] = count
        return self._token_counts[key]

    # -- scoring -------------------------------------------------------------------------------------------

    def _evaluate(self, recipe: MergeRecipe, examples: Sequence[Example], limit: Cost | None = None,
                  prior: Score | None = None) -> Score:
        """`limit`: the most this evaluation may spend (its own cap); `prior`: its minibatch's score
        (racing), whose examples it need not pay for again."""
        tally = _Tally(cap=None if limit is None else UsageCap(limit.queries, limit.tokens))
        examples = list(examples)
        tasks = [e.task for e in examples]
        length = self.max_new_tokens or generation_length(examples)  # all given, not the memo's missing few
        key = (recipe.key(), self.objective.metrics)
        if prior is not None and prior.per_example:
            by_id = {e.id: e for e in examples}
            if all(i in by_id for i in prior.example_ids):
                self.memo.remember(key, [by_id[i] for i in prior.example_ids],
                                   {k: v for k, v in prior.per_example.items()})
        try:
            per_example = self.memo.scores(key, examples,
                                           lambda missing: self._run(self._metrics(recipe, missing, tally, length)))
            objective = self._objective_for(examples, tally, length)
        except (BackendError, BudgetExhausted) as exc:
            return Score.failed(f"{type(exc).__name__}: {exc}", tally.cost())
        loss = objective.loss(per_example, tasks)
        if not math.isfinite(loss):
            return Score.failed("the loss is not finite (an answer with no tokens?)", tally.cost())
        np = require("numpy", "the api backend")
        labels = np.asarray(tasks)
        metrics: dict[str, float] = {}
        for name, values in per_example.items():
            metrics[name] = float(values.mean())
            for task in sorted(set(tasks)):
                metrics[f"{name}/{task}"] = float(values[labels == task].mean())
        for task, value in objective.task_losses(per_example, tasks).items():
            metrics[f"loss/{task}"] = value
        return Score(loss=loss, metrics=metrics, cost=tally.cost(),
                     per_example={k: tuple(float(x) for x in v) for k, v in per_example.items()},
                     example_ids=tuple(e.id for e in examples))

    def _objective_for(self, examples: list[Example], tally: _Tally, length: int) -> Objective:
        """The objective, with the base model's per-task losses as references for ``normalized``
        (queried once per set of examples, paid by the evaluation that needs them first)."""
        if not self.objective.needs_references:
            return self.objective
        ids = tuple(e.id for e in examples)
        if ids not in self._references:
            base = self._run(self._metrics(None, examples, tally, length))
            self._references[ids] = self.objective.with_references(
                self.objective.reference_losses(base, [e.task for e in examples]))
        return self._references[ids]

    async def _metrics(self, recipe: MergeRecipe | None, examples: list[Example], tally: _Tally,
                       length: int) -> dict[str, Any]:
        """Per-example values of each metric the objective needs, all requests in flight together
        (generation runs to `length` new tokens)."""
        np = require("numpy", "the api backend")
        wanted = self.objective.metrics
        pairs: dict[str, list[tuple[str, str]]] = {}
        if "ce" in wanted or "greedy_match" in wanted:  # both from one echoed-logprobs pass
            pairs["ce"] = [(e.prompt, e.answer) for e in examples]
        if "accuracy" in wanted:
            for e in examples:
                if not e.choices or e.answer not in e.choices:
                    raise BackendError(f"example {e.id!r} needs 'choices' holding its answer for choice accuracy")
            pairs["accuracy"] = [(e.prompt, c) for e in examples for c in e.choices or ()]
        prompts = [e.prompt for e in examples] if self.objective.needs_generation else []
        if await self._profile() == "llama.cpp":
            await self._adapters()
        plan = request_plan(self.objective, examples, self._per_request, self.chat, length, self.mode, self.provider)
        if not all(cap.fits(plan.queries, plan.tokens) for cap in (self.caps, tally.cap) if cap is not None):
            raise BudgetExhausted(f"the caps leave too little for a {plan.queries}-query evaluation; "
                                  "raise --max-queries / --max-tokens to go on")
        if self.mode == "session":
            return {"ce": np.asarray(await self._score_session(recipe, examples, tally))}
        greedy = "greedy_match" in wanted
        jobs = [self._ce(recipe, v, tally, top=greedy and name == "ce") for name, v in pairs.items()]
        jobs += [self._answers(recipe, prompts, tally, length)] if prompts else []
        results = await _all(jobs)
        out: dict[str, Any] = {}
        for name, values in zip(pairs, results):
            scored = np.asarray(values, dtype=float).reshape(-1, 2)  # (nll, greedy) per pair
            if name != "ce" or "ce" in wanted:
                out[name] = scored[:, 0]
            if name == "ce" and greedy:
                if np.isnan(scored[:, 1]).any():
                    raise BackendError("the provider sent no top_logprobs; greedy_match needs logprobs >= 1")
                out["greedy_match"] = scored[:, 1]
        if "accuracy" in out:
            ce, acc, at = out["accuracy"], [], 0
            for e in examples:
                n = len(e.choices or ())
                acc.append(float(e.choices[int(np.argmin(ce[at:at + n]))] == e.answer))
                at += n
            out["accuracy"] = np.asarray(acc)
        if prompts:
            from evomerge.inference import text_scores

            out.update(text_scores(wanted, results[-1], examples))
        return out

    async def _ce(self, recipe: MergeRecipe | None, pairs: list[tuple[str, str]], tally: _Tally,
                  top: bool = False) -> list[tuple[float, float]]:
        """(answer NLL, greedy match or NaN) per pair; `top` asks for the best alternative per token."""
        size = self._per_request
        chunks = [pairs[i:i + size] for i in range(0, len(pairs), size)]
        return [v for part in await _all([self._score_chunk(recipe, c, tally, top) for c in chunks]) for v in part]

    def _body(self, recipe: MergeRecipe | None, **fields: Any) -> dict[str, Any]:
        body = {"model": self.model or "base", "temperature": 0.0, **fields}
        if self.provider == "llama.cpp":  # the adapters' scales (none: the base); no cache across merges
            body["lora"] = [] if recipe is None else llamacpp.lora_field(recipe, self._lora_ids or {})
            body["cache_prompt"] = False
        elif recipe is not None:
            body[MERGE_FIELD] = recipe.to_dict()
        return body

    async def _score_chunk(self, recipe: MergeRecipe | None, chunk: list[tuple[str, str]], tally: _Tally,
                           top: bool) -> list[tuple[float, float]]:
        if self.chat:
            return await self._score_chat(recipe, chunk[0], tally, top)
        if self.provider == "llama.cpp":
            return await self._score_forced(recipe, chunk[0], tally)
        texts = [p + a for p, a in chunk]
        body = self._body(recipe, prompt=texts, max_tokens=0, echo=True, logprobs=int(top))

        def parse(resp: Any) -> tuple[list[tuple[float, float]], int]:
            choices = sorted(resp["choices"], key=lambda c: c["index"])
            if len(choices) != len(chunk) or any(not (c.get("logprobs") or {}).get("token_logprobs") for c in choices):
                raise ValueError("the provider's answer lacks a choice or its logprobs")
            lps = [c["logprobs"] for c in choices]
            out = [(answer_nll(lp["tokens"], lp["token_logprobs"], lp["text_offset"], p),
                    answer_greedy(lp["tokens"], lp["token_logprobs"], lp.get("top_logprobs"), lp["text_offset"], p)
                    if top else math.nan)
                   for lp, (p, _) in zip(lps, chunk)]
            return out, _tokens(resp, sum(len(lp["tokens"]) for lp in lps))  # echo: every prompt token

        # the openai client's raw post: the same request as completions.create(extra_body={"merge": ...}),
        # answered as a dict, which skips building typed models (a third of the client's time per query)
        return await self._request(lambda: self._client.post("/completions", body=body, cast_to=object),
                                   _json_object(parse), _token_bound(texts), tally)

    async def _score_forced(self, recipe: MergeRecipe | None, pair: tuple[str, str],
                            tally: _Tally) -> list[tuple[float, float]]:
        """(answer NLL, greedy match) of one answer decoded under a grammar admitting only it
        (llama.cpp has no echo of prompt logprobs; `llamacpp`'s module docstring says which tokens)."""
        prompt, answer = pair
        fields = llamacpp.forced_fields(prompt, answer)
        body = self._body(recipe, **fields)
        bound = _token_bound([prompt + answer]) + fields["max_tokens"]

        def parse(resp: Any) -> tuple[list[tuple[float, float]], int | _Uncounted]:
            content = (resp["choices"][0].get("logprobs") or {}).get("content")
            scores = llamacpp.forced_scores(content, llamacpp.continuation(prompt, answer))
            return [scores], _tokens(resp, _Uncounted((self._sent(fields["prompt"]),), known=len(content)))

        return await self._request(lambda: self._client.post("/completions", body=body, cast_to=object),
                                   _json_object(parse), bound, tally)

    async def _score_chat(self, recipe: MergeRecipe | None, pair: tuple[str, str], tally: _Tally,
                          top: bool) -> list[tuple[float, float]]:
        """(answer NLL, greedy match or NaN) of one answer as the final assistant message after the
        user's prompt; the provider returns exactly the answer's tokens (`protocol`'s rule)."""
        prompt, answer = pair
        body = self._body(recipe, messages=chat_messages(prompt, answer), max_tokens=0, logprobs=True,
                          echo=True, continue_final_message=True, add_generation_prompt=False,
                          **({"top_logprobs": 1} if top else {}))

        def parse(resp: Any) -> tuple[list[tuple[float, float]], int | _Uncounted]:
            content = resp["choices"][0]["logprobs"]["content"]
            if not content:
                raise ValueError("the provider's chat answer lacks the answer's logprobs")
            lps = [c["logprob"] for c in content]
            greedy = all_greedy(lps, [[t["logprob"] for t in c.get("top_logprobs") or ()] for c in content])
            return [(mean_nll(lps), greedy if top else math.nan)], _tokens(resp, _Uncounted((self._sent(
                messages=body["messages"]),)))

        bound = _token_bound([prompt + answer], chat=True)  # the answer's logprobs alone omit the prompt
        return await self._request(lambda: self._client.post("/chat/completions", body=body, cast_to=object),
                                   _json_object(parse), bound, tally)

    async def _answers(self, recipe: MergeRecipe | None, prompts: list[str], tally: _Tally, length: int) -> list[str]:
        """Greedy answers of at most `length` tokens, cut at the first newline and stripped (as
        `evomerge.inference` does locally): a completion of the prompt without its trailing spaces,
        or with `chat` the assistant's reply to the prompt as a user message."""
        async def chunk(part: list[str]) -> list[str]:
            if self.chat:
                body = self._body(recipe, messages=chat_messages(part[0]), max_tokens=length)
                sent = (self._sent(messages=body["messages"]),)
            else:
                body = self._body(recipe, prompt=[generation_prompt(p) for p in part], max_tokens=length)
                sent = tuple(self._sent(p) for p in body["prompt"])

            def parse(resp: Any) -> tuple[list[str], int | _Uncounted]:
                choices = sorted(resp["choices"], key=lambda c: c["index"])
                if len(choices) != len(part):
                    raise ValueError("the provider's answer lacks a choice")
                raw = [str(c["message"]["content"] if self.chat else c["text"]) for c in choices]
                generated = tuple((t, str(c.get("finish_reason"))) for t, c in zip(raw, choices))
                return [t.split("\n", 1)[0].strip() for t in raw], _tokens(resp, _Uncounted(sent, generated, length))

            path = "/chat/completions" if self.chat else "/completions"
            bound = _token_bound(part, self.chat) + len(part) * length
            return await self._request(lambda: self._client.post(path, body=body, cast_to=object),
                                       _json_object(parse), bound, tally)

        size = self._per_request
        parts = [prompts[i:i + size] for i in range(0, len(prompts), size)]
        return [a for part in await _all([chunk(p) for p in parts]) for a in part]

    async def _score_session(self, recipe: MergeRecipe, examples: list[Example], tally: _Tally) -> list[float]:
        fingerprint = (recipe.experts, tuple((e.id, e.prompt, e.answer) for e in examples))
        for _ in range(2):  # a session the provider evicted is opened again, once
            if fingerprint not in self._sessions:
                self._sessions[fingerprint] = await self._open_session(recipe, examples, tally)
            session_id, tokens = self._sessions[fingerprint]

            def parse(resp: Any) -> tuple[list[float], int]:
                per = resp.get("per_example")
                if not isinstance(per, list) or len(per) != len(examples):
                    raise ValueError("the provider's session answer lacks per_example losses")
                return [math.nan if v is None else float(v) for v in per], _tokens(resp, tokens)

            try:
                return await self._request(lambda: self._client.post(
                    f"/sessions/{session_id}/evaluate", body={MERGE_FIELD: recipe.to_dict()}, cast_to=object),
                    _json_object(parse), tokens, tally)
            except BackendError as exc:
                if not str(exc).startswith("provider answered 404"):
                    raise
                self._sessions.pop(fingerprint, None)
        raise BackendError("the provider keeps losing the merge session; check its max_sessions")

    async def _open_session(self, recipe: MergeRecipe, examples: list[Example], tally: _Tally) -> tuple[str, int]:
        body = {"experts": list(recipe.experts), "method": "evo_tv" if recipe.method == "evo_tv" else "evo",
                "examples": [{"prompt": e.prompt, "answer": e.answer, "id": e.id} for e in examples]}

        def parse(resp: Any) -> tuple[tuple[str, int], int]:
            if "id" not in resp:
                raise ValueError("the provider's session answer lacks an id")
            return (str(resp["id"]), int(resp.get("tokens_per_evaluation", 0))), 0

        return await self._request(lambda: self._client.post("/sessions", body=body, cast_to=object),
                                   _json_object(parse), 0, tally)

    # -- preflight -------------------------------------------------------------------------------------------

    def check(self) -> None:
        """One request or two at start-up; raise one clear `BackendError` line if the provider won't do."""
        self._run(self._check())

    def experts(self) -> list[str]:
        """The experts the provider serves (its /models entries other than the base; llama.cpp's adapters)."""
        openai = require("openai", "the api backend")

        async def listed() -> list[str]:
            if await self._profile() == "llama.cpp":
                return sorted(await self._adapters())
            try:
                models = await self._unpaid_get("/models")
            except (openai.APIError, ValueError) as exc:
                raise BackendError(f"the provider at {self.api_base} did not list its models "
                                   f"({type(exc).__name__}: {exc}); is it up? check --api-base") from None
            return [m["id"] for m in models.get("data", []) if m.get("kind", "expert") != "base"]

        return self._run(listed())

    async def _unpaid_get(self, path: str) -> Any:
        """GET an unpaid route (the model list): retried on transient failures and garbled answers,
        outside the caps (the provider does not count it), at least `RETRIES` times: it costs nothing,
        and a start-up that fails on one is a run that never starts."""
        openai = require("openai", "the api backend")
        retries = max(self.retries, RETRIES)
        for attempt in range(retries + 1):
            try:
                answer = await self._client.get(path, cast_to=object)
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

    async def _check(self) -> None:
        openai = require("openai", "the api backend")
        where = f"the provider at {self.api_base}"
        try:
            names = [str(m["id"]) for m in (await self._unpaid_get("/models"))["data"]]
        except openai.AuthenticationError:
            raise BackendError(f"{where} refused the API key (401); set {self.api_key_env} to a valid key") from None
        except openai.APIConnectionError as exc:
            raise BackendError(f"cannot reach {where} ({exc}); is it running? check --api-base") from None
        except openai.APIStatusError as exc:
            raise BackendError(f"{where} answered {exc.status_code} to GET /models: {_message(exc)}") from None
        except Exception as exc:  # non-JSON or wrong shape: not an OpenAI-compatible provider
            raise BackendError(f"{where} did not answer GET /models with OpenAI-style JSON ({type(exc).__name__}); "
                               "is --api-base the /v1 root of an OpenAI-compatible server?") from None
        if self.model is not None and self.model not in names:
            raise BackendError(f"{where} has no model {self.model!r}; it serves {', '.join(names[:10])}")
        if await self._profile() == "llama.cpp":
            await self._adapters()
            try:  # the base answers one forced answer with its tokens' logprobs
                await self._score_forced(None, ("Hello", " world"), _Tally())
            except BackendError as exc:
                raise BackendError(f"{where} (llama.cpp) cannot score answers by grammar and logprobs: {exc}") from None
        elif self.mode == "logprobs" and self.chat:
            body = {"model": self.model or names[0], "messages": chat_messages("Hello", " world"), "max_tokens": 0,
                    "logprobs": True, "echo": True, "continue_final_message": True, "add_generation_prompt": False}
            try:
                await self._request(lambda: self._client.post("/chat/completions", body=body, cast_to=object),
                                    _json_object(lambda r: _parse_chat_probe(r, self._sent(messages=body["messages"]))),
                                    _token_bound(["Hello world"], chat=True), None)
            except BackendError as exc:
                raise BackendError(f"{where} cannot score chat answers (task.chat): {exc}") from None
        elif self.mode == "logprobs":
            try:
                await self._request(lambda: self._client.completions.create(
                    model=self.model or names[0], prompt=["Hello world"], max_tokens=0, echo=True, logprobs=0),
                    _parse_probe, _token_bound(["Hello world"]), None)
            except BackendError as exc:
                raise BackendError(f"{where} cannot score by logprobs: {exc}; use the session mode or "
                                   "a provider that supports echo+logprobs") from None


def _reserve(caps: list[UsageCap], tokens: int) -> None:
    """Reserve one query of `tokens` on every cap, or on none (a refusal releases the others)."""
    for i, cap in enumerate(caps):
        try:
            cap.reserve(tokens)
        except BudgetExhausted:
            for held in caps[:i]:
                held.settle(tokens, None)
            raise


async def _all(jobs: list[Awaitable[Any]]) -> list[Any]:
    """Await every job; then raise the first failure. No sibling is cancelled: a request once sent
    is answered and counted, or released, so the caps and the provider's count agree."""
    if len(jobs) == 1:
        return [await jobs[0]]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _json_object(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap `parse` so an answer that is not a JSON object (truncated, HTML) is a retryable ValueError."""

    def checked(resp: Any) -> Any:
        if not isinstance(resp, dict):
            raise ValueError(f"the provider answered {type(resp).__name__}, not a JSON object")
        try:
            return parse(resp)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"the provider's answer is malformed ({type(exc).__name__}: {exc})") from None

    return checked


def _maybe_served(openai: Any, exc: Exception) -> bool:
    """Whether a failed request may still have been served: it timed out, or its answer arrived
    garbled. Such a request counts as a query (at its token bound), so a cap also bounds what the
    provider served; a refused or dropped connection, or an error status, was not served."""
    return isinstance(exc, openai.APITimeoutError) or not isinstance(exc, openai.APIConnectionError)


def _parse_probe(resp: Any) -> tuple[None, int]:
    choice = resp.choices[0] if getattr(resp, "choices", None) else None
    if choice is None or choice.logprobs is None or not choice.logprobs.token_logprobs:
        raise BackendError("it answers echo+logprobs requests without logprobs")
    return None, _tokens(resp, len(choice.logprobs.tokens))


def _parse_chat_probe(resp: Any, sent: dict[str, Any]) -> tuple[None, int | _Uncounted]:
    content = ((resp["choices"][0].get("logprobs") or {}).get("content")) if resp.get("choices") else None
    if not content:
        raise BackendError("it answers echo + continue_final_message chat requests without logprobs.content "
                           "(vLLM's extensions)")
    return None, _tokens(resp, _Uncounted((sent,)))


def _tokens(resp: Any, fallback: int | _Uncounted) -> int | _Uncounted:
    """The provider's usage (total tokens), else `fallback`: a count the answer holds, or what to count."""
    usage = resp.get("usage") if isinstance(resp, dict) else getattr(resp, "usage", None)
    if usage is None:
        return fallback
    total = usage.get("total_tokens") if isinstance(usage, dict) else getattr(usage, "total_tokens", None)
    return int(total) if total is not None else fallback


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(exc, "message", exc))[:300]


@register_backend("api")
@dataclass(frozen=True)
class ApiEvaluatorFactory:
    """A picklable recipe for an api evaluator: each worker builds its own `ApiBackend` from it.

    Holds the key's environment variable name, never the key (`secret_env`: a Ray executor passes
    that variable to its actors through their runtime_env). `bound` tells the search's spend ledger
    the worst case of one evaluation, and the evaluator takes the `limit` the ledger reserved and
    racing's `prior` (`evomerge.scheduler._base`).
    """

    api_base: str
    api_key_env: str
    splits: Splits
    uses_gpu = False  # a client: Ray places it on CPU even on a GPU cluster
    objective: Objective | None = None
    options: tuple[tuple[str, Any], ...] = ()
    repository: str | None = None
    """The repository on this machine where the provider was started here (for the exports)."""

    @classmethod
    def from_config(cls, config: SearchConfig, stack: ExitStack, resume: bool = False) -> Prepared:
        """The provider at --api-base, or the reference server started on loopback (entered on
        `stack`) over the repository (default: the tiny demo zoo). The user's examples stay here.

        The start-up probe's paid request is counted (`Prepared.spent`, journaled by the search), so
        the journal's ledger equals what the provider served. A resumed run probes with no caps left:
        only the unpaid GET /models runs (its spend may already be at the cap, and the provider answered
        the run that started it)."""
        from evomerge.repository import Repository
        from evomerge.serve.protocol import Limits

        local = config.api.base is None or config.repository is not None
        repo_dir = repository_dir(config) if local else None
        splits = load_splits(config.task, Repository.open(repo_dir) if repo_dir is not None else None)
        length = generation_budget(config, splits, Limits().max_tokens)
        base = config.api.base
        if base is None:
            from evomerge.serve.embedded import serving

            print(f"starting the reference provider over {repo_dir} on loopback", flush=True)
            base = stack.enter_context(serving(repo_dir))
        options = (("mode", config.api.mode), ("concurrency", config.api.concurrency),
                   ("timeout", config.api.timeout), ("retries", config.api.max_retries), ("chat", config.task.chat),
                   ("max_new_tokens", length)) + (() if config.batch_size is None else (("batch_size", config.batch_size),))
        probe = ApiBackend(base, api_key_env=config.api.key_env, provider=config.api.provider, **dict(options))
        try:
            probe.caps = UsageCap(0, 0) if resume else UsageCap(config.max_queries, config.max_tokens)
            try:
                probe.check()
            except BudgetExhausted:  # resumed: the paid part of the probe is skipped
                pass
            experts = select_experts(config.experts, probe.experts())
            spent = Cost(probe.caps.queries, probe.caps.tokens)
        finally:
            probe.close()
        options += (("provider", probe.provider),)  # settled: every worker speaks the same profile
        if probe.provider == "llama.cpp":
            refused = llamacpp.space_error(config.space.name, config.space.options)
            if refused is not None:
                raise ConfigError(f"{base} is llama.cpp's server: {refused}")
        factory = cls(base, config.api.key_env, splits, Objective.from_config(config.objective), options,
                      None if repo_dir is None else str(repo_dir))
        return Prepared(experts, factory, spent)

    @property
    def has_validation(self) -> bool:
        return bool(self.splits.validation)

    @property
    def weights(self) -> Weights:
        """The repository where it is on this machine; its layers only where the provider takes
        per-block recipes (llama.cpp's server takes one scale per adapter)."""
        if self.repository is None:
            return Weights()
        from evomerge.repository import Repository

        repo = Repository.open(self.repository)
        return Weights(repo, None if dict(self.options).get("provider") == "llama.cpp" else repo.block_layers)

    def fingerprint(self) -> dict[str, Any]:
        options = {k: v for k, v in self.options if k not in ("concurrency", "timeout", "retries")}
        return {"backend": "api", "objective": repr(self.objective), "examples": splits_digest(self.splits),
                "options": options}

    @property
    def secret_env(self) -> tuple[str, ...]:
        return (self.api_key_env,)

    def bound(self, split: str) -> tuple[Cost, Cost]:
        """(the worst case of one evaluation on `split`: every request retried to the limit, the
        base model's references queried too; what it needs when nothing fails)."""
        options = dict(self.options)
        objective = self.objective or Objective()
        examples = self.splits.get(split)
        # an unsettled provider ("auto") is bounded as llama.cpp: one prompt per request, answers decoded
        provider = "llama.cpp" if options.get("provider") == "auto" else options.get("provider", "evomerge")
        per_request = 1 if options.get("chat") or provider == "llama.cpp" else options.get("batch_size", BATCH_SIZE)
        length = options.get("max_new_tokens") or generation_length(examples)
        mode = options.get("mode", "logprobs")
        once = request_plan(objective, examples, per_request, bool(options.get("chat")), length, mode, provider)
        # the session mode opens a session the provider evicted once more; normalized adds the references
        passes = 2 if mode == "session" or objective.needs_references else 1
        attempts = options.get("retries", RETRIES) + 1
        return Cost(once.queries * passes * attempts, once.tokens * passes * attempts), once

    def __call__(self) -> Evaluator:
        backend = ApiBackend(self.api_base, api_key_env=self.api_key_env, objective=self.objective,
                             **dict(self.options))
        return lambda recipe, split, **options: backend.evaluate(recipe, self.splits.get(split), **options)
