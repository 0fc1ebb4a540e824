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


def test_with_cross_recipe_batching_off_each_recipe_is_merged_and_scored_alone(host) -> None:
    """`evomerge serve --no-cross-recipe`: the path before shared forwards, one merge and at least
    one forward per recipe, the same answers as with sharing on."""
    recipes = [MergeRecipe("evo_tv", ("math", "colour"), (0.3 * i - 1.0, 0.6), (0.5, 1.0)) for i in range(6)]
    out = {}
    for shared in (True, False):
        worker = MergeWorker(host, max_batch_texts=64, cross_recipe=shared)

        async def burst(worker=worker) -> list:
            return await asyncio.gather(*(worker.score(r, [TEXT]) for r in recipes))

        try:
            out[shared] = asyncio.run(burst())
        finally:
            worker.close()
        stats = worker.stats
        if shared:  # (the first may be taken before the others queue: merged alone)
            assert stats.merges <= 1 and stats.forward_passes < len(recipes)
        else:
            assert stats.merges == len(recipes) and stats.forward_passes >= len(recipes)
    for on, off in zip(out[True], out[False]):
        assert on[0].token_logprobs == pytest.approx(off[0].token_logprobs, abs=1e-5)


def test_a_score_request_given_up_while_queued_never_runs(host) -> None:
    """A request that gave up while it waited (past its deadline: its client has the 504) is
    dropped from the queue, so it holds the model no longer."""
    import time

    worker = MergeWorker(host)

    async def run() -> None:
        busy = asyncio.ensure_future(worker.call(None, lambda h: time.sleep(1.0)))
        await asyncio.sleep(0.1)  # the worker is inside the slow call
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(worker.score(None, [TEXT]), 0.2)
        await busy
        await worker.score(None, [TEXT[:10]])  # the worker goes on with later requests

    try:
        asyncio.run(run())
    finally:
        worker.close()
    assert worker.stats.texts_scored == 1  # only the later request was scored
