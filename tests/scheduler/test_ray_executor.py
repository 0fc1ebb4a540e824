"""RayExecutor on a real Ray: concurrency, actor reuse, deaths, timeouts, shutdown."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import pytest

from evomerge.errors import BackendError, ConfigError
from evomerge.recipe import MergeRecipe
from evomerge.scheduler.ray_executor import SHUTDOWN_ERROR, RayExecutor, actor_resources
from tests.helpers.ray_fitness import BrokenFactory, DelayServer, HttpFactory, ProbeFactory, squares

pytestmark = pytest.mark.timeout(120)


def recipe(*weights: float, **meta: object) -> MergeRecipe:
    return MergeRecipe("linear", tuple(f"e{i}" for i in range(len(weights))), weights, meta=meta)


@pytest.fixture(scope="module")
def executor(ray_session):
    with RayExecutor(ProbeFactory(), workers=3, eval_timeout=2.0, max_retries=1,
                     num_cpus_per_worker=0.25) as ex:
        assert ex.wait_ready(timeout=60)
        yield ex


def test_workers_evaluate_concurrently(executor):
    scores = [f.result(timeout=60) for f in [executor.submit(recipe(1.0, i, sleep=0.8), "fit") for i in range(3)]]
    assert all(s.ok for s in scores)
    assert len({s.metrics["pid"] for s in scores}) == 3
    # All three ran at once: the last to start began before the first to finish ended.
    assert max(s.metrics["start"] for s in scores) < min(s.metrics["end"] for s in scores)


def test_each_worker_holds_its_own_gpu_where_the_cluster_has_gpus(executor):
    scores = [f.result(timeout=60) for f in [executor.submit(recipe(1.0, i, sleep=0.5), "fit") for i in range(3)]]
    assert sorted(s.metrics["gpu"] for s in scores) == sorted({s.metrics["gpu"] for s in scores})
    assert all(s.metrics["gpu"] >= 0 for s in scores)


def test_a_factory_that_needs_no_gpu_leaves_them_free(ray_session):
    with RayExecutor(ProbeFactory(uses_gpu=False), workers=1, num_cpus_per_worker=0.25) as ex:
        assert ex.submit(recipe(1.0), "fit").result(timeout=60).metrics["gpu"] == -1.0


def test_each_actor_builds_once_and_scores_many(executor):
    recipes = [recipe(0.1 * i, -0.2 * i) for i in range(30)]
    scores = [f.result(timeout=60) for f in [executor.submit(r, "fit") for r in recipes]]
    assert [s.loss for s in scores] == [squares(r) for r in recipes]
    calls_by_pid: dict[float, float] = {}
    for s in scores:
        calls_by_pid[s.metrics["pid"]] = max(calls_by_pid.get(s.metrics["pid"], 0), s.metrics["calls"])
    assert len(calls_by_pid) <= 3
    assert max(calls_by_pid.values()) > 10 / 3  # evaluators persist across candidates


def test_worker_killed_mid_candidate_is_replaced_and_the_job_retried(executor, tmp_path):
    restarts = executor.restarts
    future = executor.submit(recipe(3.0, announce=str(tmp_path), sleep=1.5), "fit")
    deadline = time.time() + 30
    while not any(tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.02)
    victim = int(next(tmp_path.iterdir()).name)
    os.kill(victim, signal.SIGKILL)
    score = future.result(timeout=60)
    assert score.ok and score.loss == 9.0
    assert score.metrics["pid"] != victim
    assert executor.restarts == restarts + 1
    assert executor.wait_ready(timeout=60)
    # The pool is whole again: three workers still run side by side.
    test_workers_evaluate_concurrently(executor)


def test_a_candidate_that_always_kills_its_worker_fails_after_the_retries(executor):
    poison = executor.submit(recipe(1.0, crash=True), "fit")
    healthy = [executor.submit(recipe(2.0, float(i)), "fit") for i in range(5)]
    score = poison.result(timeout=60)
    assert not score.ok and score.status == "failed" and math.isnan(score.loss)
    assert "gave up after 2 attempt(s)" in score.error and "died" in score.error
    assert [f.result(timeout=60).loss for f in healthy] == [4.0 + i * i for i in range(5)]


def test_a_candidate_over_the_timeout_is_cancelled_and_failed(executor):
    started = time.time()
    slow = executor.submit(recipe(1.0, sleep=30.0), "fit")
    score = slow.result(timeout=60)
    assert not score.ok and "timed out after 2s" in score.error
    assert time.time() - started < 15
    assert executor.submit(recipe(0.5), "fit").result(timeout=60).loss == 0.25


def test_a_factory_that_cannot_build_fails_each_job_with_its_reason(ray_session):
    with RayExecutor(BrokenFactory(), workers=1, max_retries=0, num_cpus_per_worker=0.25) as ex:
        score = ex.submit(recipe(1.0), "fit").result(timeout=60)
    assert not score.ok
    assert "could not start" in score.error and "no model at" in score.error


def test_shutdown_fails_the_running_job_and_cancels_the_queued(ray_session):
    ex = RayExecutor(ProbeFactory(sleep=20.0), workers=1, num_cpus_per_worker=0.25)
    running = ex.submit(recipe(1.0), "fit")
    queued = ex.submit(recipe(2.0), "fit")
    while not running.running():
        time.sleep(0.02)
    ex.shutdown()
    assert running.result(timeout=30).error == SHUTDOWN_ERROR
    assert queued.cancelled()
    with pytest.raises(BackendError, match="shut down"):
        ex.submit(recipe(1.0), "fit")


def test_an_http_fitness_runs_on_the_workers(ray_session):
    with DelayServer(delay=0.3) as server, \
            RayExecutor(HttpFactory(server.url), workers=2, num_cpus_per_worker=0.25) as ex:
        scores = [f.result(timeout=60) for f in [ex.submit(recipe(1.0, float(i)), "fit") for i in range(4)]]
    assert [s.loss for s in scores] == [1.0 + i * i for i in range(4)]
    assert all(s.cost.queries == 1 for s in scores)


def test_actor_resources_share_the_cpus_and_honour_overrides(ray_session):
    cpus = ray_session.cluster_resources()["CPU"]
    assert actor_resources(2, None, None) == (min(1.0, cpus / 2), 1.0)  # the session Ray has GPUs
    assert actor_resources(64, None, None)[0] * 64 <= cpus
    assert actor_resources(4, 0.5, 0.1) == (0.1, 0.5)


@pytest.mark.parametrize("kwargs", [{"workers": 0}, {"workers": 1, "eval_timeout": 0}, {"workers": 1, "max_retries": -1}])
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        RayExecutor(ProbeFactory(), **kwargs)


@pytest.mark.timeout(400)  # the actor imports torch and loads a model: slow on a loaded machine
def test_a_population_evaluator_takes_the_queued_candidates_together(ray_session, tmp_path):
    """An actor whose evaluator has `many` (the local backend's population path) is handed the
    queued candidates of one split at once: the same scores as in-process, one shared cost."""
    from evomerge.backends.local import LocalEvaluatorFactory
    from evomerge.objectives import Objective
    from evomerge.tasks import Example, Splits
    from tests.helpers import tiny

    base = tiny.build_base(tmp_path / "base")
    experts = {}
    for i in range(2):
        tiny.build_lora_expert(base, tmp_path / "experts" / f"lora{i}", seed=70 + i)
        experts[f"lora{i}"] = {"path": f"experts/lora{i}", "kind": "lora", "task": None, "distractor": False}
    tiny.write_zoo(tmp_path, experts)
    fit = tuple(Example(f"say {w}:", w, "word", f"w:{w}") for w in ("cat", "dog", "sun"))
    factory = LocalEvaluatorFactory(str(tmp_path), Splits(fit, (), ()), Objective("ce"), device="cpu",
                                    dtype="float32", population_cost=math.inf)
    recipes = [MergeRecipe("evo_tv", ("lora0", "lora1"), (0.5 * i, -0.3), (1.0, 0.5)) for i in range(8)]
    with RayExecutor(factory, workers=1, num_cpus_per_worker=0.25) as ex:
        assert ex.wait_ready(timeout=300)
        scores = [f.result(timeout=120) for f in [ex.submit(r, "fit") for r in recipes]]
    evaluate = factory()
    for r, s in zip(recipes, scores):
        assert s.ok and s.loss == pytest.approx(evaluate(r, "fit").loss, abs=1e-5)
    assert len({s.cost.seconds for s in scores}) < len(scores)  # a batch shares its time evenly
