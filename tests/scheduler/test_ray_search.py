"""`evomerge.search` on Ray workers: same result as in-process, exact budget through worker deaths."""

from __future__ import annotations

import pytest

import evomerge
from evomerge.journal import Journal
from evomerge.scheduler.ray_executor import RayExecutor
from evomerge.search_spaces import build_space
from tests.helpers.ray_fitness import ProbeFactory, squares

pytestmark = pytest.mark.timeout(180)

EXPERTS = ["a", "b", "c", "d"]


def test_a_seeded_search_on_ray_matches_the_in_process_one(ray_session):
    space = build_space("linear", EXPERTS)
    runs = {kind: evomerge.search(squares, space, budget=24, optimizer="cma", seed=7, workers=3, executor=kind)
            for kind in ("threads", "ray")}
    threads, ray = runs["threads"], runs["ray"]
    assert ray.best_recipe == threads.best_recipe
    assert ray.best_loss == threads.best_loss
    assert ray.history == threads.history  # the same candidates, told in the same order
    assert len(ray.history) == 24


def test_a_worker_killed_mid_candidate_costs_no_budget(ray_session, tmp_path):
    flag = tmp_path / "crashed"
    factory = ProbeFactory(crash_once=str(flag), sleep=0.05)
    executor = RayExecutor(factory, workers=2, num_cpus_per_worker=0.25)
    journal = tmp_path / "run.sqlite"
    result = evomerge.search(space=build_space("linear", EXPERTS), evaluator=factory, budget=20, seed=1,
                             workers=2, executor=executor, journal=journal)
    assert flag.exists() and executor.restarts == 1  # one worker really died mid-candidate
    assert len(result.trials) == 20 and all(t.ok for t in result.trials)
    with Journal.open(journal) as store:
        assert store.count("fit") == 20
        assert sorted(t.trial for t in store.trials(split="fit")) == list(range(20))
