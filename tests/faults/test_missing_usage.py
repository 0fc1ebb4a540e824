"""A provider whose answers omit `usage` (the fault proxy strips it): the client counts the tokens
by the provider's POST /tokenize as usage would have, and without /tokenize at the stated upper
bound, never as 0 (issue 20)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import evomerge
from evomerge.backends.remote import ApiEvaluatorFactory
from evomerge.journal import Journal
from evomerge.objectives import Objective
from evomerge.search_spaces import build_space
from evomerge.tasks import Splits
from tests.helpers.api_search import EXAMPLES, KEY_ENV, VALIDATION
from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.provider import API_KEY

pytestmark = pytest.mark.timeout(300)

# echoed logprobs (ce) and generated answers (exact match): both kinds of paid request
OBJECTIVE = Objective(metric={"ce": 1.0, "exact_match": 0.5})


def journal_tokens(url: str, journal: Path, **proxy: tuple[str, ...]) -> tuple[int, FaultProxy]:
    """The tokens a seeded 6-evaluation search journals through a proxy faulted as `proxy` says."""
    os.environ[KEY_ENV] = API_KEY
    with FaultProxy(url, **proxy) as faulted:
        factory = ApiEvaluatorFactory(faulted.base_url, KEY_ENV, Splits(EXAMPLES, VALIDATION, ()), OBJECTIVE,
                                      options=(("batch_size", 4), ("max_new_tokens", 3)))
        evomerge.search(space=build_space("evo_joint", ["math", "colour", "french"]), evaluator=factory,
                        budget=6, seed=5, journal=journal, workers=1)
    with Journal.open(journal) as store:
        assert all(t.ok for t in store.trials(split="fit"))
        return store.totals().tokens, faulted


def test_tokens_without_usage_are_counted_by_tokenize_or_bounded(server, tmp_path) -> None:
    reported, _ = journal_tokens(server.base_url, tmp_path / "usage.sqlite")
    counted, proxy = journal_tokens(server.base_url, tmp_path / "counted.sqlite", strip=("usage",))
    assert proxy.routes["POST /tokenize"] > 0  # the generated answers were counted there
    assert counted == reported > 0  # what the provider's usage said, to the token
    bounded, proxy = journal_tokens(server.base_url, tmp_path / "bounded.sqlite", strip=("usage",),
                                    blocked=("/tokenize",))
    # asked by the requests in flight when the first 404 came (one evaluation's two generation
    # requests, 4 prompts and 4 answers each, at most), then never again
    assert 0 < proxy.routes["blocked POST /tokenize"] <= 16
    assert bounded > reported
    print(f"TOKENS usage {reported}, by /tokenize {counted}, bounded {bounded}")
