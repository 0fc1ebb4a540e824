"""Paid queries under racing, threads, Ray and faults: the provider never serves more than
`max_queries`, and the journal's ledger equals what the provider served (issue 20)."""

from __future__ import annotations

import pytest

from evomerge.scheduler.race import Race
from tests.faults.api_search import search_through_faults
from tests.serve.fixtures import API_KEY

pytestmark = pytest.mark.timeout(300)
RACE = Race(fraction=0.25, warmup=3)


@pytest.mark.parametrize("rate", [0.0, 0.3])
@pytest.mark.parametrize("race", [None, RACE], ids=["full", "raced"])
def test_the_cap_holds_at_the_provider_on_threads(server, tmp_path, rate, race) -> None:
    run = search_through_faults(server.base_url, API_KEY, tmp_path / "run.sqlite", rate, budget=40, seed=3,
                                max_queries=25, workers=2, race=race)
    assert run.served <= 25 and run.forwarded <= 25
    assert run.ledger == run.served  # every query the provider served is in the journal's ledger
    assert run.paid < 40  # the cap, not the budget, ended the run
    if race is not None:
        assert any(r[2].startswith("fit:") for r in run.rows)  # minibatches are journaled rows


@pytest.mark.parametrize("race", [None, RACE], ids=["full", "raced"])
def test_the_cap_holds_across_ray_workers(ray_session, server, tmp_path, race) -> None:
    """Each actor holds its own copy of whatever it was given; the ledger in the driver is one."""
    run = search_through_faults(server.base_url, API_KEY, tmp_path / "run.sqlite", 0.0, budget=40, seed=3,
                                max_queries=25, workers=2, executor="ray", race=race)
    assert run.served <= 25 and run.ledger == run.served
