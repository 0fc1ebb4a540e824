"""Searches through a faulty network to a real provider: every evaluation journaled exactly once,
failures marked, the budget exact, and every query the provider served accounted for."""

from __future__ import annotations

import math

import pytest

from tests.helpers.api_search import FaultRun, search_through_faults
from tests.helpers.provider import API_KEY

pytestmark = pytest.mark.timeout(300)


def check_nothing_lost(run: FaultRun) -> None:
    keys = [r[:3] for r in run.rows]
    assert len(set(keys)) == len(keys)  # each (stage, trial, split) exactly once
    for stage, trial, split, status, error, loss, queries, cached in run.rows:
        if status == "failed":
            assert error, (stage, trial)
        else:
            assert status == "ok" and loss is not None and math.isfinite(loss) and not error
    assert run.served == run.forwarded  # the provider saw only what came through the proxy
    assert run.queries == run.forwarded  # every request the provider served is in the journal's account


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_a_search_through_faults_completes_with_the_exact_budget(server, tmp_path, rate) -> None:
    run = search_through_faults(server.base_url, API_KEY, tmp_path / "run.sqlite", rate, budget=8, seed=int(rate * 10))
    check_nothing_lost(run)
    assert run.paid == 8
    assert sum(n for fault, n in run.faults.items() if fault != "ok") > 0  # faults really happened


def test_a_query_cap_holds_at_the_provider_through_faults(server, tmp_path) -> None:
    run = search_through_faults(server.base_url, API_KEY, tmp_path / "run.sqlite", 0.3, budget=40, seed=7,
                                max_queries=15)
    check_nothing_lost(run)
    assert run.forwarded <= 15 and run.queries <= 15
    assert run.paid < 40  # the cap, not the budget, ended the run
