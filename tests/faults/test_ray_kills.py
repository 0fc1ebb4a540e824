"""Ray workers SIGKILLed at random mid-search: the search still pays exactly its budget."""

from __future__ import annotations

import math

import pytest

from evomerge.journal import Journal
from tests.helpers.ray_kills import search_with_kills

pytestmark = pytest.mark.timeout(240)


def test_workers_killed_at_random_cost_no_budget(ray_session, tmp_path) -> None:
    budget = 30
    result, killer = search_with_kills(tmp_path / "run.sqlite", budget, kills=3, seed=4)
    assert len(killer.killed) == 3  # three worker processes really died
    with Journal.open(tmp_path / "run.sqlite") as journal:
        trials = journal.trials(split="fit")
        assert journal.count("fit") == budget
    assert sorted(t.trial for t in trials) == list(range(budget))  # each trial once
    pids = {int(t.score.metrics["pid"]) for t in trials if t.ok}
    assert len(pids) > 3  # replacements did the work after the kills
    for t in trials:
        if t.ok:  # a retried candidate scores what it would have scored undisturbed
            assert t.loss == pytest.approx(sum(w * w for w in t.recipe.weights))
        else:
            assert "worker died" in t.score.error
    assert math.isfinite(result.best_loss)
