"""What the api backend sends to score a recipe, per mode and provider profile, and what a scoring
pass costs at most (`request_plan`, which the spend ledger reserves).

- ``logprobs``: ``prompt + answer`` with ``echo`` and ``logprobs``, ``max_tokens`` 0, the recipe
  as ``merge`` in the body; the answer tokens are scored here, so labels stay on the client.
  With ``chat`` one conversation per request to /chat/completions, the answer a final assistant
  message (``echo`` + ``continue_final_message``, vLLM's extensions). Through llama.cpp one
  answer per request, decoded under a grammar admitting only it (`evomerge.backends.llamacpp`).
- generation (the text metrics): greedy answers, after the user turn with ``chat``.
- ``session``: the examples uploaded once to the provider's merge session, the loss sent back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from evomerge._imports import require
from evomerge.backends import llamacpp
from evomerge.backends.transport import Parse, Transport, json_object
from evomerge.backends.usage import Tally, Uncounted, answer_tokens, settled_all, token_bound, tokenize_body
from evomerge.errors import BackendError, ConfigError
from evomerge.objectives import Objective
from evomerge.recipe import MergeRecipe
from evomerge.score import Cost
from evomerge.serve.protocol import (
    MERGE_FIELD,
    all_greedy,
    answer_greedy,
    answer_nll,
    chat_messages,
    generation_prompt,
    mean_nll,
)
from evomerge.tasks import Example

Scored = list[tuple[float, float]]
"""(answer NLL, greedy match or NaN) per scored pair."""


def request_plan(objective: Objective, examples: Sequence[Example], per_request: int, chat: bool, length: int,
                 mode: str, provider: str = "evomerge") -> Cost:
    """The queries and a token bound of one scoring pass over `examples`, no retry counted: what
    `Requests` sends for them (the session mode: open the session, evaluate in it; llama.cpp:
    each scored answer decoded once more, `llamacpp.forced_fields`)."""
    if mode == "session":
        return Cost(2, token_bound([e.prompt + e.answer for e in examples]))
    wanted = objective.metrics
    texts = [(e.prompt, e.answer) for e in examples] if "ce" in wanted or "greedy_match" in wanted else []
    choices = [(e.prompt, c) for e in examples for c in e.choices or ()] if "accuracy" in wanted else []
    prompts = [e.prompt for e in examples] if objective.needs_generation else []
    queries = sum(-(-len(group) // per_request) for group in (texts, choices, prompts))
    scored = texts + choices
    forced = sum(llamacpp.forced_fields(p, a)["max_tokens"] for p, a in scored) if provider == "llama.cpp" else 0
    return Cost(queries, token_bound([p + a for p, a in scored] + prompts, chat) + len(prompts) * length + forced)


def refuse_profile(provider: str, mode: str, chat: bool) -> None:
    """Refuse what llama.cpp's profile cannot score here: chat, and the session mode."""
    if provider == "llama.cpp" and (mode == "session" or chat):
        raise ConfigError("through llama.cpp the api backend scores plain prompts in the logprobs mode; "
                          "set task.chat to false and api.mode to logprobs")


class Requests:
    """The scoring requests of one provider: its profile (``provider``, settled by `use`), the
    model, how many prompts a request holds, llama.cpp's adapter ids and the open merge sessions."""

    def __init__(self, transport: Transport, model: str | None, mode: str, chat: bool, batch_size: int) -> None:
        self.transport, self.model, self.mode, self.chat = transport, model, mode, chat
        self.per_request = 1 if chat else batch_size  # a chat request holds one conversation
        self.provider = "auto"
        self.lora_ids: dict[str, int] | None = None
        self._sessions: dict[tuple[Any, ...], tuple[str, int]] = {}

    def use(self, provider: str) -> None:
        """Settle the profile; llama.cpp's takes one prompt per request (its usage of a many-prompt
        request counts the first prompt only)."""
        refuse_profile(provider, self.mode, self.chat)
        self.provider = provider
        if provider == "llama.cpp":
            self.per_request = 1

    async def profile(self) -> str:
        """The provider profile, asking the server once when it is "auto" (llama.cpp answers GET /props)."""
        if self.provider == "auto":
            openai = require("openai", "the api backend")
            try:
                props = await self.transport.get(llamacpp.server_root(self.transport.api_base) + "/props")
            except (openai.APIError, ValueError):  # the reference provider has no /props (404): not llama.cpp
                props = None
            self.use("llama.cpp" if llamacpp.is_llamacpp(props) else "evomerge")
        return self.provider

    async def adapters(self) -> dict[str, int]:
        """llama.cpp's adapter ids by expert name (GET /lora-adapters, once)."""
        if self.lora_ids is None:
            listing = await self.transport.get(llamacpp.server_root(self.transport.api_base) + "/lora-adapters")
            self.lora_ids = llamacpp.adapter_ids(listing)
        return self.lora_ids

    def sent(self, text: str | None = None, messages: list[dict[str, str]] | None = None,
             generated: bool = False) -> dict[str, Any]:
        """The /tokenize body of a sent prompt or conversation (`tokenize_body`) for this provider."""
        return tokenize_body(self.provider, text, messages, generated)

    async def _post(self, path: str, body: dict[str, Any], parse: Parse, bound: int, tally: Tally) -> Any:
        return await self.transport.request(lambda: self.transport.post(path, body), json_object(parse), bound,
                                            tally)

    def _body(self, recipe: MergeRecipe | None, **fields: Any) -> dict[str, Any]:
        body = {"model": self.model or "base", "temperature": 0.0, **fields}
        if self.provider == "llama.cpp":  # the adapters' scales (none: the base); no cache across merges
            body["lora"] = [] if recipe is None else llamacpp.lora_field(recipe, self.lora_ids or {})
            body["cache_prompt"] = False
        elif recipe is not None:
            body[MERGE_FIELD] = recipe.to_dict()
        return body

    async def ce(self, recipe: MergeRecipe | None, pairs: list[tuple[str, str]], tally: Tally,
                 top: bool = False) -> Scored:
        """(answer NLL, greedy match or NaN) per pair; `top` asks for the best alternative per token."""
        size = self.per_request
        chunks = [pairs[i:i + size] for i in range(0, len(pairs), size)]
        return [v for part in await settled_all([self._score_chunk(recipe, c, tally, top) for c in chunks])
                for v in part]

    async def _score_chunk(self, recipe: MergeRecipe | None, chunk: list[tuple[str, str]], tally: Tally,
                           top: bool) -> Scored:
        if self.chat:
            return await self.score_chat(recipe, chunk[0], tally, top)
        if self.provider == "llama.cpp":
            return await self.score_forced(recipe, chunk[0], tally)
        texts = [p + a for p, a in chunk]
        body = self._body(recipe, prompt=texts, max_tokens=0, echo=True, logprobs=int(top))

        def parse(resp: Any) -> tuple[Scored, int | Uncounted]:
            choices = sorted(resp["choices"], key=lambda c: c["index"])
            if len(choices) != len(chunk) or any(not (c.get("logprobs") or {}).get("token_logprobs") for c in choices):
                raise ValueError("the provider's answer lacks a choice or its logprobs")
            lps = [c["logprobs"] for c in choices]
            out = [(answer_nll(lp["tokens"], lp["token_logprobs"], lp["text_offset"], p),
                    answer_greedy(lp["tokens"], lp["token_logprobs"], lp.get("top_logprobs"), lp["text_offset"], p)
                    if top else math.nan)
                   for lp, (p, _) in zip(lps, chunk, strict=True)]
            return out, answer_tokens(resp, sum(len(lp["tokens"]) for lp in lps))  # echo: every prompt token

        return await self._post("/completions", body, parse, token_bound(texts), tally)

    async def score_forced(self, recipe: MergeRecipe | None, pair: tuple[str, str], tally: Tally) -> Scored:
        """(answer NLL, greedy match) of one answer decoded under a grammar admitting only it
        (llama.cpp has no echo of prompt logprobs; `llamacpp`'s module docstring says which tokens)."""
        prompt, answer = pair
        fields = llamacpp.forced_fields(prompt, answer)
        body = self._body(recipe, **fields)

        def parse(resp: Any) -> tuple[Scored, int | Uncounted]:
            content: Any = (resp["choices"][0].get("logprobs") or {}).get("content")  # a list: forced_scores checks
            scores = llamacpp.forced_scores(content, llamacpp.continuation(prompt, answer))
            return [scores], answer_tokens(resp, Uncounted((self.sent(fields["prompt"]),), known=len(content)))

        return await self._post("/completions", body, parse, token_bound([prompt + answer]) + fields["max_tokens"],
                                tally)

    async def score_chat(self, recipe: MergeRecipe | None, pair: tuple[str, str], tally: Tally, top: bool,
                         ) -> Scored:
        """(answer NLL, greedy match or NaN) of one answer as the final assistant message after the
        user's prompt; the provider returns exactly the answer's tokens (`protocol`'s rule)."""
        prompt, answer = pair
        body = self._body(recipe, messages=chat_messages(prompt, answer), max_tokens=0, logprobs=True,
                          echo=True, continue_final_message=True, add_generation_prompt=False,
                          **({"top_logprobs": 1} if top else {}))

        def parse(resp: Any) -> tuple[Scored, int | Uncounted]:
            content = resp["choices"][0]["logprobs"]["content"]
            if not content:
                raise ValueError("the provider's chat answer lacks the answer's logprobs")
            lps = [c["logprob"] for c in content]
            greedy = all_greedy(lps, [[t["logprob"] for t in c.get("top_logprobs") or ()] for c in content])
            return [(mean_nll(lps), greedy if top else math.nan)], answer_tokens(resp, Uncounted((self.sent(
                messages=body["messages"]),)))

        bound = token_bound([prompt + answer], chat=True)  # the answer's logprobs alone omit the prompt
        return await self._post("/chat/completions", body, parse, bound, tally)

    async def answers(self, recipe: MergeRecipe | None, prompts: list[str], tally: Tally, length: int) -> list[str]:
        """Greedy answers of at most `length` tokens, cut at the first newline and stripped (as
        `evomerge.inference` does locally): a completion of the prompt without its trailing spaces,
        or with `chat` the assistant's reply to the prompt as a user message."""
        async def chunk(part: list[str]) -> list[str]:
            if self.chat:
                body = self._body(recipe, messages=chat_messages(part[0]), max_tokens=length)
                sent: tuple[dict[str, Any], ...] = (self.sent(messages=body["messages"]),)
            else:
                body = self._body(recipe, prompt=[generation_prompt(p) for p in part], max_tokens=length)
                sent = tuple(self.sent(p) for p in body["prompt"])

            def parse(resp: Any) -> tuple[list[str], int | Uncounted]:
                choices = sorted(resp["choices"], key=lambda c: c["index"])
                if len(choices) != len(part):
                    raise ValueError("the provider's answer lacks a choice")
                raw = [str(c["message"]["content"] if self.chat else c["text"]) for c in choices]
                generated = tuple((self.sent(t, generated=True), str(c.get("finish_reason")))
                                  for t, c in zip(raw, choices, strict=True))
                return ([t.split("\n", 1)[0].strip() for t in raw],
                        answer_tokens(resp, Uncounted(sent, generated, length)))

            path = "/chat/completions" if self.chat else "/completions"
            return await self._post(path, body, parse, token_bound(part, self.chat) + len(part) * length, tally)

        size = self.per_request
        parts = [prompts[i:i + size] for i in range(0, len(prompts), size)]
        return [a for part in await settled_all([chunk(p) for p in parts]) for a in part]

    async def session(self, recipe: MergeRecipe, examples: list[Example], tally: Tally) -> list[float]:
        """Per-example losses from the provider's merge session over `examples` (opened once)."""
        fingerprint = (recipe.experts, tuple((e.id, e.prompt, e.answer) for e in examples))
        for _ in range(2):  # a session the provider evicted is opened again, once
            if fingerprint not in self._sessions:
                self._sessions[fingerprint] = await self._open_session(recipe, examples, tally)
            session_id, tokens = self._sessions[fingerprint]

            def parse(resp: Any, tokens: int = tokens) -> tuple[list[float], int | Uncounted]:
                per = resp.get("per_example")
                if not isinstance(per, list) or len(per) != len(examples):
                    raise ValueError("the provider's session answer lacks per_example losses")
                return [math.nan if v is None else float(v) for v in per], answer_tokens(resp, tokens)

            try:
                return await self._post(f"/sessions/{session_id}/evaluate", {MERGE_FIELD: recipe.to_dict()}, parse,
                                        tokens, tally)
            except BackendError as exc:
                if not str(exc).startswith("provider answered 404"):
                    raise
                self._sessions.pop(fingerprint, None)
        raise BackendError("the provider keeps losing the merge session; check its max_sessions")

    async def _open_session(self, recipe: MergeRecipe, examples: list[Example], tally: Tally) -> tuple[str, int]:
        body = {"experts": list(recipe.experts), "method": "evo_tv" if recipe.method == "evo_tv" else "evo",
                "examples": [{"prompt": e.prompt, "answer": e.answer, "id": e.id} for e in examples]}

        def parse(resp: Any) -> tuple[tuple[str, int], int]:
            if "id" not in resp:
                raise ValueError("the provider's session answer lacks an id")
            return (str(resp["id"]), int(resp.get("tokens_per_evaluation", 0))), 0

        return await self._post("/sessions", body, parse, 0, tally)

    # -- start-up probes (`ApiBackend.check`) -------------------------------------------------------------

    async def probe_chat(self, model: str, tally: Tally) -> None:
        """One chat answer scored by its logprobs (vLLM's echo + continue_final_message)."""
        body: dict[str, Any] = {"model": model, "messages": chat_messages("Hello", " world"), "max_tokens": 0,
                                "logprobs": True, "echo": True, "continue_final_message": True,
                                "add_generation_prompt": False}

        def parse(resp: Any) -> tuple[None, int | Uncounted]:
            content = ((resp["choices"][0].get("logprobs") or {}).get("content")) if resp.get("choices") else None
            if not content:
                raise BackendError("it answers echo + continue_final_message chat requests without logprobs.content "
                                   "(vLLM's extensions)")
            return None, answer_tokens(resp, Uncounted((self.sent(messages=body["messages"]),)))

        await self._post("/chat/completions", body, parse, token_bound(["Hello world"], chat=True), tally)

    async def probe_logprobs(self, model: str, tally: Tally) -> None:
        """One prompt echoed with its logprobs, through the client's typed completions call."""
        def parse(resp: Any) -> tuple[None, int | Uncounted]:
            choice = resp.choices[0] if getattr(resp, "choices", None) else None
            if choice is None or choice.logprobs is None or not choice.logprobs.token_logprobs:
                raise BackendError("it answers echo+logprobs requests without logprobs")
            return None, answer_tokens(resp, len(choice.logprobs.tokens))

        await self.transport.request(lambda: self.transport.client.completions.create(
            model=model, prompt=["Hello world"], max_tokens=0, echo=True, logprobs=0),
            parse, token_bound(["Hello world"]), tally)
