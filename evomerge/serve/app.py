"""The reference provider: an OpenAI-compatible API whose every request may carry a merge recipe.

Routes: GET /v1/models (POST / DELETE register merges as models: `evomerge.serve.registry`),
POST /v1/completions (echo + logprobs for client-side scoring),
POST /v1/chat/completions (the model's chat template; echo + continue_final_message + logprobs
score a final assistant message), the merge-session API (`evomerge.serve.sessions`), GET /v1/stats,
POST /tokenize (vLLM's and llama.cpp's route: unpaid, so a client can count what usage omits).
All model work goes through one `MergeWorker`, so one merge is active at a time and a burst
for one recipe merges once. What the provider will not serve (a prompt over `max_prompt_tokens`,
a key over its tokens per minute) is refused on the event loop before any model work, and a
request past its deadline is answered 504 (`evomerge.serve.admission`). Every error is answered
in OpenAI's error shape; none stops the server.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from evomerge._imports import require
from evomerge.errors import EvomergeError, TaskError
from evomerge.serve.admission import PromptGate, TokenRate, unless_expired, within
from evomerge.serve.guard import Guard
from evomerge.serve.host import Generated, ModelHost, Scored
from evomerge.serve.protocol import Limits, answer_start, chat_prompt, ends_after, generation_prompt
from evomerge.serve.registry import ModelRegistry, add_model_routes
from evomerge.serve.schemas import ApiError, ChatRequest, CompletionRequest, TokenizeRequest, parse_merge
from evomerge.serve.sessions import add_session_routes
from evomerge.serve.worker import MergeWorker

log = logging.getLogger("evomerge.serve")
_TYPE_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*)$")
"""pydantic's union-member tags in an error location, not field names: dropped from ``param``."""


def create_app(host: ModelHost, api_key: str | None = None, limits: Limits = Limits(), cache_size: int = 256,
               registry: ModelRegistry | None = None, cross_recipe: bool = True) -> Any:
    """The ASGI app serving `host` (auth and body limits applied before any route); `registry` keeps
    the merges registered as models (default: in memory); `cross_recipe` False scores each recipe in
    its own forward, merged (the worker's path before requests of distinct recipes shared one)."""
    fastapi = require("fastapi", "evomerge serve")
    from fastapi import Header
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    worker = MergeWorker(host, cache_size=cache_size, max_batch_texts=limits.max_batch, cross_recipe=cross_recipe)
    registry = registry if registry is not None else ModelRegistry()
    gate = PromptGate(host.tokenizer, limits.max_prompt_tokens or host.context_length or 4096)
    rate = TokenRate(limits.tokens_per_minute)

    def recipe_of(merge: dict[str, Any] | None, model: str | None) -> Any:
        """The body's merge, else the registered model's recipe, else what `parse_merge` makes of `model`."""
        registered = registry.get(model) if merge is None else None
        return registered if registered is not None else parse_merge(merge, model, host, limits)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        worker.close()

    app = fastapi.FastAPI(title="evomerge provider", version="1", lifespan=lifespan,
                          description="OpenAI-compatible completions over merged experts; send a MergeRecipe "
                                      "as `merge` in any request body, or use the merge-session API.")
    app.state.worker = worker

    def error(status: int, message: str, param: str | None, kind: str, code: str | None = None,
              headers: dict[str, str] | None = None) -> Any:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                            headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_: Any, exc: ApiError) -> Any:
        return error(exc.status, exc.message, exc.param, exc.kind, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Any, exc: RequestValidationError) -> Any:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ())[1:] if not _TYPE_TAG.match(str(p))) or None
        return error(422, f"{param or 'body'}: {first.get('msg')}", param, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Any, exc: StarletteHTTPException) -> Any:  # unknown route, unparsable body, ...
        return error(exc.status_code, str(exc.detail), None, "invalid_request_error")

    @app.exception_handler(EvomergeError)
    async def _refused(_: Any, exc: EvomergeError) -> Any:  # raised while merging: the recipe cannot be served
        return error(422, f"merge: {exc}", "merge", "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(_: Any, exc: Exception) -> Any:
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        return error(500, f"internal error ({type(exc).__name__}); the request was not served", None, "server_error")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The base model, every expert (an expert's name as `model` answers with that expert alone) and
        every registered merge, each with the longest prompt and generation it is served."""
        now = int(time.time())
        served = {"max_prompt_tokens": gate.limit, "max_tokens": limits.max_tokens}
        names = [host.base_name, *host.experts]
        data = [{"id": n, "object": "model", "created": now, "owned_by": "evomerge",
                 "kind": "base" if n == host.base_name else "expert", **served} for n in names]
        data += [{"id": n, "object": "model", "created": c, "owned_by": "evomerge", "kind": "merge", **served}
                 for n, c in registry.listing()]
        return {"object": "list", "data": data}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        """Token ids of a prompt (``prompt``, or llama.cpp's ``content``) or of ``messages`` in the chat
        template (``continue_final_message`` as vLLM takes it), counted as usage counts them; unpaid
        (not in /v1/stats' queries), so a client can count an answer that lacks usage."""
        if (req.prompt is None) + (req.content is None) + (req.messages is None) != 2:
            raise ApiError(422, "give exactly one of prompt, content or messages", "prompt")
        if req.messages is not None:  # as the chat route counts them, a continued final message included
            text = "".join(_chat_turns(host, req))
        else:
            text = req.prompt if req.prompt is not None else str(req.content)
        gate.check([text], "messages" if req.messages is not None else "prompt")
        ids = gate.ids(text)
        return {"count": len(ids), "max_model_len": gate.limit, "tokens": ids}

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        """Merge and batching counters (merges = distinct recipes merged, cache misses)."""
        return worker.stats.to_dict()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, authorization: str | None = Header(None)) -> dict[str, Any]:
        """OpenAI completions; `echo` + `logprobs` with `max_tokens` 0 returns the prompt's token logprobs."""
        deadline = time.monotonic() + limits.deadline
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        _check_batch(prompts, req.max_tokens, limits)
        prompt_tokens = gate.check(prompts, "prompt", indexed=not isinstance(req.prompt, str))
        recipe = recipe_of(req.merge, req.model)
        with rate.charged(authorization, prompt_tokens + len(prompts) * req.max_tokens) as bill:
            generated = [Generated("", 0)] * len(prompts)
            if req.max_tokens > 0:
                generated = await within(deadline, worker.call(recipe, unless_expired(deadline, lambda h: h.generate(
                    prompts, req.max_tokens, req.temperature, req.seed, max_time=deadline - time.monotonic()))))
            completions_ = [g.text for g in generated]
            scored: Sequence[Scored | None] = [None] * len(prompts)
            if req.logprobs is not None:
                texts = [p + c for p, c in zip(prompts, completions_, strict=True)]
                scored = await within(deadline, worker.score(recipe, texts, req.logprobs))
            completion_tokens = sum(g.tokens for g in generated)
            bill.used = prompt_tokens + completion_tokens
        worker.stats.queries += 1
        choices = []
        for i, (p, g, s) in enumerate(zip(prompts, generated, scored, strict=True)):
            choices.append({"index": i, "text": (p + g.text) if req.echo else g.text,
                            "finish_reason": _finish(g, req.max_tokens),
                            "logprobs": None if s is None else _logprobs(s, 0 if req.echo else len(p), req.logprobs)})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model or host.base_name, "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, authorization: str | None = Header(None)) -> dict[str, Any]:
        """OpenAI chat completions under the requested merge (greedy when temperature is 0). With
        `logprobs`, `choices[0].logprobs.content` holds the generated tokens; with `echo` and
        `continue_final_message`, the final assistant message's tokens come first: that message
        continues the templated prompt verbatim (as vLLM renders it for a template that keeps
        content as is), and its tokens are those ending after the prompt (`protocol`'s rule)."""
        deadline = time.monotonic() + limits.deadline
        max_tokens = next((m for m in (req.max_completion_tokens, req.max_tokens) if m is not None), 16)
        prompt, final = _chat_turns(host, req)
        _check_batch([prompt], max_tokens, limits)
        text = prompt + final
        prompt_tokens = gate.check([text], "messages")
        recipe = recipe_of(req.merge, req.model)
        source = generation_prompt(text) if max_tokens > 0 else text  # what generation continues
        with rate.charged(authorization, prompt_tokens + max_tokens) as bill:
            out = await within(deadline, worker.call(recipe, unless_expired(deadline, lambda h: h.generate(
                [source], max_tokens, req.temperature, req.seed, special=False,
                max_time=deadline - time.monotonic())[0])))
            full = source + out.text
            start = answer_start(prompt) if req.echo else len(source)
            logprobs = None
            if req.logprobs:
                (scored,) = await within(deadline, worker.score(recipe, [full], req.top_logprobs or 0, special=False))
                logprobs = {"content": _chat_logprobs(scored, start), "refusal": None}
            bill.used = prompt_tokens + out.tokens
        worker.stats.queries += 1
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model or host.base_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": full[start:], "refusal": None},
                             "finish_reason": _finish(out, max_tokens), "logprobs": logprobs}],
                "usage": _usage(prompt_tokens, out.tokens)}

    add_session_routes(app, host, worker, limits, gate, rate)
    add_model_routes(app, host, registry, limits)
    return Guard(app, api_key, limits.max_body_bytes)


def _check_batch(prompts: list[str], max_tokens: int, limits: Limits) -> None:
    if not prompts:
        raise ApiError(422, "prompt: give at least one prompt", "prompt")
    if len(prompts) > limits.max_batch:
        raise ApiError(422, f"prompt: {len(prompts)} prompts in one request; at most {limits.max_batch}", "prompt")
    if max_tokens > limits.max_tokens:
        raise ApiError(422, f"max_tokens is {max_tokens}; at most {limits.max_tokens}", "max_tokens")


def _finish(g: Generated, max_tokens: int) -> str:
    """"stop" when generation ended before `max_tokens` (the model's end of text), else "length"."""
    return "stop" if g.tokens < max_tokens else "length"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _logprobs(s: Scored, start: int, top: int | None) -> dict[str, Any]:
    """OpenAI's completions logprobs for the tokens from character `start` on (offsets relative to it)."""
    keep = [i for i, off in enumerate(s.text_offset) if off >= start]
    return {"tokens": [s.tokens[i] for i in keep], "token_logprobs": [s.token_logprobs[i] for i in keep],
            "text_offset": [s.text_offset[i] - start for i in keep],
            "top_logprobs": None if not top or s.top_logprobs is None else [s.top_logprobs[i] for i in keep]}


def _chat_turns(host: ModelHost, req: ChatRequest | TokenizeRequest) -> tuple[str, str]:
    """The templated prompt and the final assistant message it continues ("" unless
    `continue_final_message`), or a 422 naming what is wrong."""
    if req.messages is None:  # a TokenizeRequest may carry a prompt instead; /tokenize checks first
        raise ApiError(422, "give messages to apply the chat template to", "messages")
    messages = [m.model_dump() for m in req.messages]
    final = ""
    if req.continue_final_message:
        if req.add_generation_prompt or len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ApiError(422, "continue_final_message needs add_generation_prompt false and a final assistant "
                                "message after the prompt", "continue_final_message")
        final = messages.pop()["content"]
    return _chat_text(host, messages, req.add_generation_prompt or req.continue_final_message), final


def _chat_text(host: ModelHost, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    try:
        return chat_prompt(host.tokenizer, messages, add_generation_prompt)
    except TaskError as exc:
        raise ApiError(422, str(exc), "messages") from None


def _chat_logprobs(s: Scored, start: int) -> list[dict[str, Any]]:
    """OpenAI's chat logprobs items for the tokens that end after character `start`. Byte tokens
    of one character share its span: the first carries the character (text and UTF-8 bytes), the
    rest are empty, so the tokens (and the bytes) join to the message, as OpenAI's do."""
    keep = ends_after([off + len(tok) for tok, off in zip(s.tokens, s.text_offset, strict=True)], start)
    tops = s.top_logprobs or [None] * len(s.tokens)
    shown = [tok if i == 0 or off != s.text_offset[i - 1] else "" for i, (tok, off) in
             enumerate(zip(s.tokens, s.text_offset, strict=True))]

    def item(token: str, logprob: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [{**item(tok, lp), "top_logprobs": [item(t, v) for t, v in (top or {}).items()]}
            for tok, lp, top, k in zip(shown, s.token_logprobs, tops, keep, strict=True) if k]
