"""ThreadExecutor: a hung candidate times out as failed, its thread is replaced, the search goes on."""

from __future__ import annotations

import threading
import time

import pytest

import evomerge
from evomerge.errors import BackendError, ConfigError
from evomerge.recipe import MergeRecipe
from evomerge.scheduler.threads import ThreadExecutor
from evomerge.score import Score
from evomerge.search_spaces import EvoSpace

pytestmark = pytest.mark.timeout(60)


class HangingFactory:
    """Evaluators that block on `release` for a recipe whose first weight is 99 (a hung provider call)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.built = 0
        self.late: list[Score] = []

    def __call__(self):
        self.built += 1

        def evaluate(recipe: MergeRecipe, split: str) -> Score:
            if recipe.weights[0] == 99:
                self.release.wait(30)
                self.late.append(Score(loss=-1.0))
                return self.late[-1]
            return Score(loss=sum(w * w for w in recipe.weights))

        return evaluate


def recipe(*weights: float) -> MergeRecipe:
    return MergeRecipe("linear", tuple(f"e{i}" for i in range(len(weights))), weights)


def test_a_hung_candidate_times_out_and_a_fresh_thread_takes_its_place():
    factory = HangingFactory()
    ex = ThreadExecutor(factory, workers=1, eval_timeout=0.5)
    hung = ex.submit(recipe(99.0), "fit")
    queued = [ex.submit(recipe(1.0, float(i)), "fit") for i in range(3)]  # behind it on the only thread
    score = hung.result(timeout=10)
    assert not score.ok and "timed out after 0.5s" in score.error and score.cost.seconds == 0.5
    assert [f.result(timeout=10).loss for f in queued] == [1.0, 2.0, 5.0]
    assert factory.built == 2  # the replacement built its own evaluator
    factory.release.set()  # the abandoned thread finishes; its late result is dropped
    ex.shutdown()
    assert len(factory.late) == 1 and not hung.result().ok


def test_without_a_timeout_a_slow_candidate_is_waited_for():
    factory = HangingFactory()
    ex = ThreadExecutor(factory, workers=1)
    slow = ex.submit(recipe(99.0), "fit")
    threading.Timer(0.3, factory.release.set).start()
    assert slow.result(timeout=10).loss == -1.0
    ex.shutdown()


def test_shutdown_cancels_what_has_not_started():
    factory = HangingFactory()
    ex = ThreadExecutor(factory, workers=1, eval_timeout=5.0)
    running = ex.submit(recipe(99.0), "fit")
    waiting = ex.submit(recipe(1.0), "fit")
    while not running.running():  # the first has started (else shutdown rightly cancels it too)
        time.sleep(0.005)
    threading.Timer(0.3, factory.release.set).start()
    ex.shutdown()
    assert running.result().loss == -1.0 and waiting.cancelled()
    ex.shutdown()  # idempotent
    with pytest.raises(BackendError, match="shut down"):
        ex.submit(recipe(1.0), "fit")


def test_search_with_threads_records_the_timeout_and_spends_its_budget():
    calls: list[int] = []
    release = threading.Event()

    def fitness(recipe: MergeRecipe) -> float:
        calls.append(1)
        if len(calls) == 3:
            release.wait(30)
        return sum((w - 0.3) ** 2 for w in recipe.weights)

    result = evomerge.search(fitness, EvoSpace(["a", "b"]), budget=8, eval_timeout=0.5, seed=1)
    release.set()
    failed = [t for t in result.trials if not t.ok]
    assert len(result.trials) == 8 and len(failed) == 1
    assert "timed out" in failed[0].score.error and result.best_loss is not None


def test_a_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="eval_timeout"):
        ThreadExecutor(HangingFactory(), eval_timeout=0)
