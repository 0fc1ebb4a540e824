"""The merge-session API, the paper's protocol: upload examples once, then send (α, β) and get the loss.

POST /v1/sessions                {experts, examples: [{prompt, answer}], method}  -> {id, ...}
POST /v1/sessions/{id}/evaluate  {alpha, beta} or {merge}                           -> {loss, per_example, usage}
DELETE /v1/sessions/{id}
The loss is the mean over examples of the answer tokens' mean negative log-probability
(`evomerge.serve.protocol.answer_nll`), the same number the client computes from echoed logprobs.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from evomerge.errors import RecipeError
from evomerge.recipe import MergeRecipe
from evomerge.serve.admission import PromptGate, TokenRate, within
from evomerge.serve.host import ModelHost
from evomerge.serve.protocol import Limits, answer_nll
from evomerge.serve.schemas import ApiError, SessionEvaluateRequest, SessionRequest, check_bounds, parse_merge
from evomerge.serve.worker import MergeWorker


@dataclass(frozen=True)
class Session:
    id: str
    experts: tuple[str, ...]
    method: str
    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    ids: tuple[str, ...]
    tokens: int  # tokens one evaluation scores (what its usage reports)


def _alpha_beta(req: SessionEvaluateRequest, s: Session, host: ModelHost, limits: Limits) -> MergeRecipe:
    if req.merge is not None:
        recipe = parse_merge(req.merge, None, host, limits)
        if recipe is None or set(recipe.experts) - set(s.experts):
            raise ApiError(422, "merge.experts must be among the session's experts", "merge.experts")
        return recipe
    n = len(s.experts)
    alpha = req.alpha if req.alpha is not None else [1.0] * n
    beta = req.beta if req.beta is not None else [1.0 / n] * n
    for name, vec in (("alpha", alpha), ("beta", beta)):
        if len(vec) != n:
            raise ApiError(422, f"{name} has {len(vec)} values for the session's {n} experts", name)
    try:
        recipe = MergeRecipe(s.method, s.experts, tuple(beta), tuple(alpha))
    except RecipeError as exc:
        raise ApiError(422, str(exc).replace("weights", "beta").replace("densities", "alpha"),
                       "alpha" if "densities" in str(exc) else "beta") from None
    try:
        check_bounds(recipe, limits)
    except ApiError as exc:
        raise ApiError(422, exc.message.replace("merge.weights", "beta"), "beta") from None
    return recipe


def add_session_routes(app: Any, host: ModelHost, worker: MergeWorker, limits: Limits, gate: PromptGate,
                       rate: TokenRate) -> None:
    """Attach the session routes to `app`; sessions live in memory, the oldest evicted past the cap.
    An example over the prompt limit is refused when the session opens; an evaluation is charged
    to its key's tokens per minute and answered within the deadline."""
    from fastapi import Header

    sessions: OrderedDict[str, Session] = OrderedDict()

    @app.post("/v1/sessions")
    async def create_session(req: SessionRequest) -> dict[str, Any]:
        """Open a session over a subset of experts with the user's examples (uploaded once)."""
        unknown = [e for e in req.experts if e not in host.experts]
        if unknown:
            raise ApiError(422, f"experts: unknown expert(s) {unknown}; GET /v1/models lists them", "experts")
        if len(set(req.experts)) != len(req.experts):
            raise ApiError(422, "experts: an expert is listed twice", "experts")
        if len(req.examples) > limits.max_session_examples:
            raise ApiError(422, f"examples: {len(req.examples)} examples; at most {limits.max_session_examples}",
                           "examples")
        prompts = tuple(e.prompt for e in req.examples)
        answers = tuple(e.answer for e in req.examples)
        tokens = gate.check([p + a for p, a in zip(prompts, answers, strict=True)], "examples", indexed=True)
        s = Session(f"sess-{uuid.uuid4().hex}", tuple(req.experts), req.method, prompts, answers,
                    tuple(e.id or str(i) for i, e in enumerate(req.examples)), tokens)
        sessions[s.id] = s
        while len(sessions) > limits.max_sessions:
            sessions.popitem(last=False)
        return {"id": s.id, "object": "merge.session", "experts": list(s.experts), "method": s.method,
                "examples": len(prompts), "tokens_per_evaluation": tokens}

    def get(session_id: str) -> Session:
        if session_id not in sessions:
            raise ApiError(404, f"no session {session_id!r} (expired or never created); POST /v1/sessions",
                           "session_id", code="session_not_found")
        sessions.move_to_end(session_id)
        return sessions[session_id]

    @app.post("/v1/sessions/{session_id}/evaluate")
    async def evaluate(session_id: str, req: SessionEvaluateRequest,
                       authorization: str | None = Header(None)) -> dict[str, Any]:
        """Merge with α (keep ratios) and β (signed scales) and return the loss on the session's examples."""
        deadline = time.monotonic() + limits.deadline
        s = get(session_id)
        recipe = _alpha_beta(req, s, host, limits)
        texts = [p + a for p, a in zip(s.prompts, s.answers, strict=True)]
        scored = []
        with rate.charged(authorization, s.tokens):
            for at in range(0, len(texts), limits.max_batch):
                scored += await within(deadline, worker.score(recipe, texts[at:at + limits.max_batch]))
        per = [answer_nll(x.tokens, x.token_logprobs, x.text_offset, p) for x, p in zip(scored, s.prompts, strict=True)]
        finite = [v for v in per if math.isfinite(v)]
        worker.stats.queries += 1
        return {"object": "merge.evaluation", "loss": sum(finite) / len(finite) if finite else None,
                "per_example": [v if math.isfinite(v) else None for v in per], "example_ids": list(s.ids),
                "recipe_key": recipe.key(), "usage": {"prompt_tokens": s.tokens, "completion_tokens": 0,
                                                      "total_tokens": s.tokens}}

    @app.delete("/v1/sessions/{session_id}")
    async def close_session(session_id: str) -> dict[str, Any]:
        get(session_id)
        del sessions[session_id]
        return {"id": session_id, "object": "merge.session", "deleted": True}
