"""The merge worker: one merge per distinct recipe, bursts batched, failures contained."""

from __future__ import annotations

import asyncio

import pytest

from evomerge.errors import RecipeError
from evomerge.recipe import MergeRecipe
from evomerge.serve.worker import MergeWorker

TEXT = "Question: what colour is the sky? Answer: blue"


def test_a_burst_for_one_recipe_merges_once_and_shares_forward_passes(host) -> None:
    worker = MergeWorker(host, max_batch_texts=16)
    recipe = MergeRecipe("ties", ("math", "colour"), (0.7, 0.4), (0.5, 0.5))

    async def burst() -> list:
        return await asyncio.gather(*(worker.score(recipe, [TEXT]) for _ in range(64)))

    try:
        out = asyncio.run(burst())
    finally:
        worker.close()
    assert worker.stats.merges == 1
    assert worker.stats.forward_passes <= 64 // 16 + 1  # 16 texts per pass, at most one partial
    assert all(o[0].token_logprobs == pytest.approx(out[0][0].token_logprobs, abs=1e-5) for o in out)


def test_interleaved_recipes_come_from_the_cache(host) -> None:
    worker = MergeWorker(host)
    a = MergeRecipe("evo", ("math",), (1.0,), (0.5,))
    b = MergeRecipe("dare", ("math", "french"), (0.5, 0.5), (0.5, 0.5), seed=1)

    async def alternate() -> list:
        return [await worker.score(r, [TEXT]) for r in (a, b, a, b, None, a)]

    try:
        out = asyncio.run(alternate())
    finally:
        worker.close()
    assert worker.stats.merges == 2 and worker.stats.cache_hits == 3
    assert out[0][0].token_logprobs == pytest.approx(out[2][0].token_logprobs, abs=1e-6)
    assert out[1][0].token_logprobs != pytest.approx(out[0][0].token_logprobs, abs=1e-4)


def test_a_failing_merge_fails_its_requests_only(host) -> None:
    worker = MergeWorker(host)
    good = MergeRecipe("ties", ("math",), (1.0,), (0.5,))  # TIES: merged, not served by shared factors

    class Broken:
        def __getattr__(self, name):
            return getattr(host, name)

        def merge(self, recipe):
            if recipe.weights[0] < 0:
                raise RecipeError("refused on purpose")
            return host.merge(recipe)

    worker.host = Broken()

    async def mixed() -> list:
        return await asyncio.gather(worker.score(MergeRecipe("ties", ("math",), (-1.0,), (0.5,)), [TEXT]),
                                    worker.score(good, [TEXT]), return_exceptions=True)

    try:
        bad, ok = asyncio.run(mixed())
    finally:
        worker.close()
    assert isinstance(bad, RecipeError) and not isinstance(ok, BaseException)


def test_score_jobs_of_distinct_low_rank_recipes_share_one_pass(host) -> None:
    """Queued together, 8 evo_tv recipes (and a TIES one, which needs its merge) are answered as
    each alone, the low-rank ones in shared passes with no merge."""
    worker = MergeWorker(host, max_batch_texts=64)
    recipes = [MergeRecipe("evo_tv", ("math", "colour"), (0.3 * i - 1.0, 0.6), (0.5, 1.0)) for i in range(8)]
    ties = MergeRecipe("ties", ("math", "colour"), (0.7, 0.4), (0.5, 0.5))
    expected = []
    for r in (*recipes, ties):
        host.activate(host.merge(r))
        expected.append(host.score([TEXT, TEXT[:20]]))
    host.activate(None)

    async def burst() -> list:
        return await asyncio.gather(*(worker.score(r, [TEXT, TEXT[:20]]) for r in (*recipes, ties)))

    try:
        out = asyncio.run(burst())
    finally:
        worker.close()
    for got, want in zip(out, expected):
        assert [g.token_logprobs for g in got] == [pytest.approx(w.token_logprobs, abs=1e-5) for w in want]
    assert worker.stats.merges == 1  # TIES alone
    assert worker.stats.forward_passes < len(recipes)
