"""A search through the api backend, with a fault-injecting proxy between it and a real provider.

Shared by tests/faults/test_api_faults.py and benchmarks/reliability.py: it runs
`evomerge.search(..., evaluator=ApiEvaluatorFactory(...))` and returns what the journal, the
proxy and the provider each saw, so a caller can check that nothing was lost or over-spent.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

import evomerge
from evomerge.backends.remote import ApiEvaluatorFactory
from evomerge.journal import Journal
from evomerge.scheduler.race import Race
from evomerge.search_spaces import build_space
from evomerge.tasks import Example, Splits
from tests.helpers.fault_proxy import FAULTS, FaultProxy

KEY_ENV = "EVOMERGE_FAULTS_API_KEY"
EXAMPLES = tuple(Example(f"Question {i}: what colour is the sky? Answer:", [" blue", " grey", " four"][i % 3],
                         task="sky", id=f"e{i}") for i in range(8))
VALIDATION = tuple(replace(e, id=f"v{e.id}") for e in EXAMPLES[:3])
CLIENT_TIMEOUT = 1.5
"""Seconds before the client gives up on a request; the proxy's ``delay`` fault holds one longer."""


@dataclass(frozen=True)
class FaultRun:
    rate: float
    budget: int
    max_queries: int | None
    rows: list[tuple]
    """(stage, trial, split, status, error, loss, queries, cached) of every journaled evaluation."""
    faults: dict[str, int]
    forwarded: int
    served: int
    """Completions the provider itself counted during the run."""
    ledger: int
    """Queries the journal's ledger holds: recorded costs plus reservations a kill left open."""

    @property
    def paid(self) -> int:
        return sum(1 for r in self.rows if r[2] == "fit" and not r[7])

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if r[3] == "failed")

    @property
    def queries(self) -> int:
        return sum(r[6] for r in self.rows if not r[7])


def served(base_url: str, key: str) -> int:
    return httpx.get(base_url + "/stats", headers={"Authorization": f"Bearer {key}"}).json()["queries"]


def search_through_faults(server_url: str, key: str, journal: Path, rate: float, budget: int, seed: int = 0,
                          max_queries: int | None = None, workers: int = 2, executor: str = "threads",
                          race: Race | None = None) -> FaultRun:
    """Search with every kind of fault at `rate` in all, split evenly; return what each side saw."""
    os.environ[KEY_ENV] = key
    rates = {fault: rate / len(FAULTS) for fault in FAULTS}
    before = served(server_url, key)
    with FaultProxy(server_url, rates=rates, seed=seed, delay=CLIENT_TIMEOUT + 1.0, retry_after=0.05) as proxy:
        factory = ApiEvaluatorFactory(proxy.base_url, KEY_ENV, Splits(EXAMPLES, VALIDATION, ()),
                                      options=(("batch_size", 4), ("retries", 2), ("backoff", 0.01),
                                               ("max_backoff", 0.05), ("timeout", CLIENT_TIMEOUT)))
        evomerge.search(space=build_space("evo_joint", ["math", "colour", "french"]), evaluator=factory,
                        budget=budget, seed=seed, journal=journal, workers=workers, max_queries=max_queries,
                        executor=executor, race=race)
        settle(proxy)
        faults, forwarded = dict(proxy.counts), proxy.forwarded
    return FaultRun(rate, budget, max_queries, journal_rows(journal), faults, forwarded,
                    served(server_url, key) - before, ledger_queries(journal))


def ledger_queries(journal: Path) -> int:
    """The journal's ledger of queries (`evomerge.scheduler.ledger`)."""
    with Journal.open(journal) as j:
        return j.totals().queries + j.outstanding().queries


def settle(proxy: FaultProxy) -> None:
    """Wait until the proxy forwarded every request it meant to (a delayed one may still be held
    after its client timed out), so `forwarded` is final."""
    deadline = time.monotonic() + proxy.delay + 5
    while time.monotonic() < deadline:
        meant = sum(proxy.counts[f] for f in ("ok", "delay", "truncate", "corrupt"))
        if proxy.forwarded >= meant:
            return
        time.sleep(0.05)


def journal_rows(journal: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(journal) as conn:
        return conn.execute("SELECT stage, trial, split, status, error, loss, queries, cached FROM evaluations"
                            " ORDER BY seq").fetchall()
