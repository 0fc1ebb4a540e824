"""`--backend api`: score recipes through an OpenAI-compatible provider that merges server-side.

The user's optimizer sees only answers. Two modes (`evomerge.backends.modes` says what each sends):
- ``logprobs`` (default): the provider returns the answer tokens' logprobs and they are scored
  here, so labels stay on the client.
- ``session``: upload the examples once to the provider's merge session and get the loss back
  (the paper's protocol: labels go to the provider). Plain prompts only: the session API has no
  chat-template step, so ``chat`` with this mode is refused.
Both follow `evomerge.serve.protocol`'s rule for the scored tokens, as the local backend does.
``provider`` picks the server's profile: ``evomerge`` (the reference provider, full recipes in
``merge``) or ``llama.cpp`` (adapter scales in ``lora``, β only: `evomerge.backends.llamacpp`);
``auto`` asks the server which it is.
Requests go through `evomerge.backends.transport` (concurrency, retries), each reserved on a
`UsageCap` before it is sent, so a query or token cap is never exceeded: the backend's own
(`caps`, for direct use) and the evaluation's `limit` (what the search's ledger reserved for it,
`evomerge.scheduler.ledger`); `evomerge.backends.usage` counts what each answer spent.
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge._imports import require
from evomerge.backends import llamacpp
from evomerge.backends._base import Backend, Evaluator, Prepared, Weights, register_backend
from evomerge.backends._config import generation_tokens, repository_dir, select_experts, splits_digest
from evomerge.backends.memo import ExampleMemo
from evomerge.backends.modes import Requests, refuse_profile, request_plan
from evomerge.backends.transport import RETRIES, Transport, message
from evomerge.backends.usage import Tally, settled_all
from evomerge.errors import BackendError, BudgetExhausted, ConfigError
from evomerge.objectives import Objective
from evomerge.recipe import MergeRecipe
from evomerge.score import Cost, Score
from evomerge.spend import UsageCap
from evomerge.tasks import Example, Splits, generation_length, load_splits

if TYPE_CHECKING:
    from evomerge.config import SearchConfig

MODES = ("logprobs", "session")
BATCH_SIZE = 16


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
        self.api_key_env, self.model, self.mode, self.concurrency = api_key_env, model, mode, concurrency
        self.caps = caps if caps is not None else UsageCap()
        self.objective = objective or Objective()
        self.max_new_tokens, self.chat = max_new_tokens, chat
        if "ce_stop" in self.objective.metrics:
            raise ConfigError("the api backend cannot score 'ce_stop' (a provider's logprobs give no probability "
                              "of the answer's end); use objective metric 'ce'")
        if mode == "session" and (self.objective.metrics != ("ce",) or self.objective.needs_references):
            raise ConfigError("the session mode scores cross-entropy only; use objective metric 'ce' with the "
                              "mean or worst aggregate, or the logprobs mode")
        if mode == "session" and chat:
            raise ConfigError("the session mode scores plain prompts (it has no chat template step); "
                              "set task.chat to false or use the logprobs mode")
        refuse_profile(provider, mode, chat)
        self._references: dict[tuple[str, ...], Objective] = {}
        self.memo = ExampleMemo()
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        self._transport = Transport(self.api_base, key, concurrency, timeout, retries, backoff, max_backoff)
        self._requests = Requests(self._transport, model, mode, chat, batch_size)
        if provider != "auto":  # else settled once the server is asked (`Requests.profile`)
            self._requests.use(provider)

    def __repr__(self) -> str:
        return f"ApiBackend(api_base={self.api_base!r}, mode={self.mode!r}, concurrency={self.concurrency})"

    @property
    def provider(self) -> str:
        return self._requests.provider

    @property
    def attempts(self) -> int:
        """Requests sent, retries included."""
        return self._transport.attempts

    @property
    def max_in_flight(self) -> int:
        """The most requests that were in flight at once."""
        return self._transport.max_in_flight

    def close(self) -> None:
        self._transport.close()

    # -- scoring -------------------------------------------------------------------------------------------

    def _evaluate(self, recipe: MergeRecipe, examples: Sequence[Example], limit: Cost | None = None,
                  prior: Score | None = None, **options: Any) -> Score:
        """`limit`: the most this evaluation may spend (its own cap); `prior`: its minibatch's score
        (racing), whose examples it need not pay for again. The scheduler sends no other `options`."""
        tally = Tally((self.caps,) if limit is None else (self.caps, UsageCap(limit.queries, limit.tokens)))
        examples = list(examples)
        length = self.max_new_tokens or generation_length(examples)  # all given, not the memo's missing few
        key = (recipe.key(), self.objective.metrics)
        if prior is not None and prior.per_example:
            by_id = {e.id: e for e in examples}
            if all(i in by_id for i in prior.example_ids):
                self.memo.remember(key, [by_id[i] for i in prior.example_ids], prior.per_example)

        def score(missing: list[Example]) -> dict[str, Any]:
            return self._transport.run(self._metrics(recipe, missing, tally, length))

        try:
            per_example = self.memo.scores(key, examples, score)
            objective = self._objective_for(examples, tally, length)
        except (BackendError, BudgetExhausted) as exc:
            return Score.from_exception(exc, tally.cost())
        result = objective.score(per_example, examples, tuple(e.id for e in examples), tally.cost())
        if not math.isfinite(result.loss):
            return Score.failed("the loss is not finite (an answer with no tokens?)", tally.cost())
        return result

    def _objective_for(self, examples: list[Example], tally: Tally, length: int) -> Objective:
        """The objective, with the base model's per-task losses as references for ``normalized``
        (queried once per set of examples, paid by the evaluation that needs them first)."""
        if not self.objective.needs_references:
            return self.objective
        ids = tuple(e.id for e in examples)
        if ids not in self._references:
            base = self._transport.run(self._metrics(None, examples, tally, length))
            self._references[ids] = self.objective.with_references(
                self.objective.reference_losses(base, [e.task for e in examples]))
        return self._references[ids]

    async def _metrics(self, recipe: MergeRecipe | None, examples: list[Example], tally: Tally,
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
        if await self._requests.profile() == "llama.cpp":
            await self._requests.adapters()
        requests = self._requests
        plan = request_plan(self.objective, examples, requests.per_request, self.chat, length, self.mode,
                            self.provider)
        if not all(cap.fits(plan) for cap in tally.caps):
            raise BudgetExhausted(f"the caps leave too little for a {plan.queries}-query evaluation; "
                                  "raise --max-queries / --max-tokens to go on")
        if self.mode == "session":
            assert recipe is not None  # the base model's references: the session mode refuses an objective needing them
            return {"ce": np.asarray(await requests.session(recipe, examples, tally))}
        greedy = "greedy_match" in wanted
        jobs: list[Awaitable[Any]] = [requests.ce(recipe, v, tally, top=greedy and name == "ce")
                                      for name, v in pairs.items()]
        jobs += [requests.answers(recipe, prompts, tally, length)] if prompts else []
        results = await settled_all(jobs)
        out: dict[str, Any] = {}
        for name, values in zip(pairs, results, strict=False):  # the answers' result, if any, comes last
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
                choices = e.choices or ()  # every example has them: checked before any request
                n = len(choices)
                acc.append(float(choices[int(np.argmin(ce[at:at + n]))] == e.answer))
                at += n
            out["accuracy"] = np.asarray(acc)
        if prompts:
            from evomerge.inference import text_scores

            out.update(text_scores(wanted, results[-1], examples))
        return out

    # -- preflight -------------------------------------------------------------------------------------------

    def check(self) -> None:
        """One request or two at start-up; raise one clear `BackendError` line if the provider won't do."""
        self._transport.run(self._check())

    def experts(self) -> list[str]:
        """The experts the provider serves (its /models entries other than the base; llama.cpp's adapters)."""
        openai = require("openai", "the api backend")

        async def listed() -> list[str]:
            if await self._requests.profile() == "llama.cpp":
                return sorted(await self._requests.adapters())
            try:
                models = await self._transport.unpaid_get("/models")
            except (openai.APIError, ValueError) as exc:
                raise BackendError(f"the provider at {self.api_base} did not list its models "
                                   f"({type(exc).__name__}: {exc}); is it up? check --api-base") from None
            return [m["id"] for m in models.get("data", []) if m.get("kind", "expert") != "base"]

        return self._transport.run(listed())

    async def _check(self) -> None:
        openai = require("openai", "the api backend")
        where = f"the provider at {self.api_base}"
        try:
            names = [str(m["id"]) for m in (await self._transport.unpaid_get("/models"))["data"]]
        except openai.AuthenticationError:
            raise BackendError(f"{where} refused the API key (401); set {self.api_key_env} to a valid key") from None
        except openai.APIConnectionError as exc:
            raise BackendError(f"cannot reach {where} ({exc}); is it running? check --api-base") from None
        except openai.APIStatusError as exc:
            raise BackendError(f"{where} answered {exc.status_code} to GET /models: {message(exc)}") from None
        except Exception as exc:  # non-JSON or wrong shape: not an OpenAI-compatible provider
            raise BackendError(f"{where} did not answer GET /models with OpenAI-style JSON ({type(exc).__name__}); "
                               "is --api-base the /v1 root of an OpenAI-compatible server?") from None
        if self.model is not None and self.model not in names:
            raise BackendError(f"{where} has no model {self.model!r}; it serves {', '.join(names[:10])}")
        probe = Tally((self.caps,))  # paid on the backend's caps; the evaluations' tallies never see it
        if await self._requests.profile() == "llama.cpp":
            await self._requests.adapters()
            try:  # the base answers one forced answer with its tokens' logprobs
                await self._requests.score_forced(None, ("Hello", " world"), probe)
            except BackendError as exc:
                raise BackendError(f"{where} (llama.cpp) cannot score answers by grammar and logprobs: {exc}") from None
        elif self.mode == "logprobs" and self.chat:
            try:
                await self._requests.probe_chat(self.model or names[0], probe)
            except BackendError as exc:
                raise BackendError(f"{where} cannot score chat answers (task.chat): {exc}") from None
        elif self.mode == "logprobs":
            try:
                await self._requests.probe_logprobs(self.model or names[0], probe)
            except BackendError as exc:
                raise BackendError(f"{where} cannot score by logprobs: {exc}; use the session mode or "
                                   "a provider that supports echo+logprobs") from None


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
        length = generation_tokens(config, splits, Limits().max_tokens)
        base = config.api.base
        if base is None:
            from evomerge.serve.embedded import serving

            print(f"starting the reference provider over {repo_dir} on loopback", flush=True)
            base = stack.enter_context(serving(repo_dir))
        options: tuple[tuple[str, Any], ...] = (("mode", config.api.mode), ("concurrency", config.api.concurrency),
                                                ("timeout", config.api.timeout), ("retries", config.api.max_retries),
                                                ("chat", config.task.chat), ("max_new_tokens", length))
        options += () if config.batch_size is None else (("batch_size", config.batch_size),)
        objective = Objective.from_config(config.objective)
        probe = ApiBackend(base, api_key_env=config.api.key_env, provider=config.api.provider, objective=objective,
                           **dict(options))
        try:
            probe.caps = UsageCap(0, 0) if resume else UsageCap(config.max_queries, config.max_tokens)
            with suppress(BudgetExhausted):  # resumed: the paid part of the probe is skipped
                probe.check()
            experts = select_experts(config.experts, probe.experts())
            spent = Cost(probe.caps.queries, probe.caps.tokens)
        finally:
            probe.close()
        options += (("provider", probe.provider),)  # settled: every worker speaks the same profile
        if probe.provider == "llama.cpp":
            refused = llamacpp.space_error(config.space.name, config.space.options)
            if refused is not None:
                raise ConfigError(f"{base} is llama.cpp's server: {refused}")
        factory = cls(base, config.api.key_env, splits, objective, options,
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
