"""One thread owns the model: it applies one merge at a time and batches requests per recipe.

Requests from any number of HTTP handlers queue here. The worker takes the oldest request,
gathers every queued request for the same recipe, makes that recipe's merged state active
(from an LRU cache keyed by `MergeRecipe.key()`, or by merging once on a miss), and answers
them all through one forward pass. So concurrent clients with distinct recipes each get answers
from their own weights, and a burst for one recipe merges once. Scoring requests of distinct
low-rank recipes (LoRA experts, a factor method) that wait together share one forward instead,
on a host with `score_many`: no merge at all, each recipe's rows served by its own factors.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import RecipeError
from evomerge.recipe import MergeRecipe
from evomerge.serve.host import ModelHost, PopulationHost, Scored

BASE_KEY = "base"
ANY_KEY = "*"
"""Jobs under this key need no particular weights (tokenizer work): they never trigger a merge."""


@dataclass
class Stats:
    """Counters the provider exposes at GET /v1/stats (what tests and benchmarks check)."""

    merges: int = 0  # merged states computed (cache misses): one per distinct recipe while the cache holds
    cache_hits: int = 0
    activations: int = 0
    forward_passes: int = 0
    jobs: int = 0
    queries: int = 0  # model requests answered (completions, chat, session evaluations)
    texts_scored: int = 0
    merge_seconds: float = 0.0
    distinct_recipes: set[str] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        return {"merges": self.merges, "cache_hits": self.cache_hits, "activations": self.activations,
                "forward_passes": self.forward_passes, "jobs": self.jobs, "queries": self.queries,
                "texts_scored": self.texts_scored, "merge_seconds": round(self.merge_seconds, 6),
                "distinct_recipes": len(self.distinct_recipes)}


@dataclass
class _Job:
    key: str
    recipe: MergeRecipe | None
    kind: str  # "score" or "call"
    payload: Any
    done: Callable[[Any, BaseException | None], None]
    cancelled: Callable[[], bool] = lambda: False  # its request gave up (past its deadline): skip it


class MergeWorker:
    """Serialises model access; `score` and `call` are awaitable from any event loop."""

    def __init__(self, host: ModelHost, cache_size: int = 256, max_batch_texts: int = 64,
                 cache_bytes: int = 2 << 30, cross_recipe: bool = True) -> None:
        self.host = host
        self._cross_recipe = cross_recipe  # False: one recipe per forward, each merged (the path before)
        self.stats = Stats()
        self._cache: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._cache_size, self._cache_bytes, self._cached_bytes = cache_size, cache_bytes, 0
        self._nbytes: Callable[[Any], int] = getattr(host, "nbytes", lambda state: 0)
        self._max_batch = max_batch_texts
        self._active: str | None = None
        self._low_rank: dict[str, bool] = {}  # recipe key -> whether it can share a forward
        self._queue: list[_Job] = []
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="evomerge-merge-worker", daemon=True)
        self._thread.start()

    async def score(self, recipe: MergeRecipe | None, texts: list[str], top: int = 0,
                    special: bool = True) -> list[Scored]:
        """Teacher-forced logprobs of `texts` under `recipe` (batched with others of the same recipe;
        `special` False: chat-templated texts, tokenized without adding special tokens)."""
        return await self._submit(recipe, "score", (list(texts), top, special))

    async def call(self, recipe: MergeRecipe | None, fn: Callable[[ModelHost], Any]) -> Any:
        """Run `fn(host)` with `recipe` active (generation and other one-off work)."""
        return await self._submit(recipe, "call", fn)

    async def anyweights(self, fn: Callable[[ModelHost], Any]) -> Any:
        """Run `fn(host)` on the worker thread whatever weights are active (token counting)."""
        return await self._submit(None, "call", fn, ANY_KEY)

    def _submit(self, recipe: MergeRecipe | None, kind: str, payload: Any,
                key: str | None = None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            def settle() -> None:
                if fut.done():
                    return
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)
            loop.call_soon_threadsafe(settle)

        key = key or (BASE_KEY if recipe is None else recipe.key())
        with self._cv:
            self._queue.append(_Job(key, recipe, kind, payload, done, fut.cancelled))
            self._cv.notify()
        return fut

    def close(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _take(self) -> list[_Job] | None:
        """The oldest job and every queued job for the same recipe (score jobs up to the batch cap);
        for a host that scores many recipes in one pass, the oldest score job and every queued score
        job of a low-rank recipe tokenized alike, whatever its recipe."""
        with self._cv:
            while not self._queue and not self._stopped:
                self._cv.wait()
            if self._stopped:
                return None
            self._queue = [j for j in self._queue if not j.cancelled()]  # their clients have their 504
            if not self._queue:
                return []
            shared = self._shareable(self._queue[0])
            if shared:
                batch: list[_Job] = []
                rest: list[_Job] = []
                texts = 0
                for job in self._queue:
                    n = len(job.payload[0]) if job.kind == "score" else 0
                    fits = not batch or texts + n <= self._max_batch
                    if fits and self._shareable(job) and job.payload[2] == self._queue[0].payload[2]:
                        batch.append(job)
                        texts += n
                    else:
                        rest.append(job)
                if len({j.key for j in batch}) > 1:
                    self._queue = rest
                    return batch
            key = self._queue[0].key
            batch, rest, texts = [], [], 0
            for job in self._queue:
                n = len(job.payload[0]) if job.kind == "score" else 0
                if job.key == key and (not batch or texts + n <= self._max_batch):
                    batch.append(job)
                    texts += n
                else:
                    rest.append(job)
            self._queue = rest
            return batch

    @property
    def _population(self) -> PopulationHost | None:
        """The host, where it scores several recipes in one forward."""
        return self.host if isinstance(self.host, PopulationHost) else None

    def _shareable(self, job: _Job) -> bool:
        """Whether `job` may share a forward with other recipes' score jobs (`host.score_many`)."""
        population = self._population
        if not self._cross_recipe or job.kind != "score" or job.recipe is None or population is None:
            return False
        known = self._low_rank.get(job.key)
        if known is None:
            if len(self._low_rank) >= 4096:  # a long-lived provider sees endless distinct recipes
                self._low_rank.clear()
            known = self._low_rank[job.key] = population.low_rank(job.recipe)
        return known

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            population = self._population
            if population is not None and len({j.key for j in batch}) > 1:  # `_take` mixes only here
                self.stats.jobs += len(batch)
                self._score_recipes(batch, population)
            else:
                self._run_one(batch)

    def _run_one(self, batch: list[_Job]) -> None:
        """Jobs of one recipe: its merged state active, their score jobs in shared passes."""
        try:
            if batch[0].key != ANY_KEY:
                self._activate(batch[0].key, batch[0].recipe)
        except BaseException as exc:  # a failed merge fails its requests, never the worker
            for job in batch:
                job.done(None, exc)
            return
        self.stats.jobs += len(batch)
        self._run_scores([j for j in batch if j.kind == "score"])
        for job in batch:
            if job.kind == "call":
                try:
                    job.done(job.payload(self.host), None)
                except BaseException as exc:
                    job.done(None, exc)

    def _activate(self, key: str, recipe: MergeRecipe | None) -> None:
        if key == BASE_KEY:
            state = None
        elif key in self._cache:
            self._cache.move_to_end(key)
            state = self._cache[key][0]
            if key != self._active:
                self.stats.cache_hits += 1
        elif recipe is None:  # only the base and calls on whatever is active come without a recipe
            raise RecipeError(f"weights {key!r} named without a recipe to merge; submit the recipe")
        else:
            start = time.perf_counter()
            state = self.host.merge(recipe)
            self.stats.merge_seconds += time.perf_counter() - start
            self.stats.merges += 1
            self.stats.distinct_recipes.add(key)
            size = self._nbytes(state)
            self._cache[key] = (state, size)
            self._cached_bytes += size
            while len(self._cache) > 1 and (len(self._cache) > self._cache_size
                                            or self._cached_bytes > self._cache_bytes):
                self._cached_bytes -= self._cache.popitem(last=False)[1][1]
        if key != self._active:
            self._active = None  # a failing activate leaves no stale claim
            self.host.activate(state)
            self.stats.activations += 1
            self._active = key

    def _run_scores(self, jobs: list[_Job]) -> None:
        """One forward pass for all score jobs of this recipe tokenized alike (plain or chat texts;
        the largest `top` serves them all)."""
        for special in sorted({j.payload[2] for j in jobs}):
            self._score_pass([j for j in jobs if j.payload[2] == special], special)

    def _score_pass(self, jobs: list[_Job], special: bool) -> None:
        texts = [t for j in jobs for t in j.payload[0]]
        top = max(j.payload[1] for j in jobs)
        try:
            scored = self.host.score(texts, top, special)
        except BaseException as exc:
            for job in jobs:
                job.done(None, exc)
            return
        self.stats.forward_passes += 1
        self.stats.texts_scored += len(texts)
        at = 0
        for job in jobs:
            n = len(job.payload[0])
            _answer(job, scored[at:at + n], top)
            at += n


    def _score_recipes(self, jobs: list[_Job], host: PopulationHost) -> None:
        """One forward pass for the score jobs of several low-rank recipes (`host.score_many`):
        no merge, the base weights stay active, each recipe's rows see its own update."""
        keys = list(dict.fromkeys(j.key for j in jobs))
        recipes = [next(j.recipe for j in jobs if j.key == k and j.recipe is not None) for k in keys]
        texts = [[t for j in jobs if j.key == k for t in j.payload[0]] for k in keys]
        top = max(j.payload[1] for j in jobs)
        try:
            self._active = None
            scored = host.score_many(recipes, texts, top, jobs[0].payload[2])
            self._active = BASE_KEY
        except Exception:  # memory, or one recipe's fault: each recipe on its own path, failing alone
            for key in keys:
                self._run_one([j for j in jobs if j.key == key])
            return
        self.stats.forward_passes += 1
        self.stats.texts_scored += sum(map(len, texts))
        self.stats.distinct_recipes.update(keys)
        at = dict.fromkeys(keys, 0)
        for job in jobs:
            n = len(job.payload[0])
            _answer(job, scored[keys.index(job.key)][at[job.key] : at[job.key] + n], top)
            at[job.key] += n


def _answer(job: _Job, scored: list[Scored], top: int) -> None:
    """Settle a score job with its texts' results, trimmed to the alternatives it asked for."""
    job.done(scored if job.payload[1] >= top else [_trim_top(s, job.payload[1]) for s in scored], None)


def _trim_top(s: Scored, top: int) -> Scored:
    if top <= 0 or s.top_logprobs is None:
        return Scored(s.tokens, s.token_logprobs, s.text_offset, None)
    trimmed = [None if alt is None else dict(sorted(alt.items(), key=lambda kv: -kv[1])[:top])
               for alt in s.top_logprobs]
    return Scored(s.tokens, s.token_logprobs, s.text_offset, trimmed)
