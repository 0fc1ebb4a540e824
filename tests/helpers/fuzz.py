"""Fuzz a running provider from its own OpenAPI schema with schemathesis, valid and invalid data.

Hypothesis drives schemathesis's per-operation strategies directly (its pytest plugin does not
load under pytest 9). Every generated request is sent over real HTTP; what counts is the status:
a 5xx or a dropped connection is a failure. Shared by tests/faults/test_server_hostile.py and
benchmarks/reliability.py.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import requests


@dataclass
class FuzzStats:
    cases: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    """One line per request answered 5xx or not at all: method, path, status or error."""


def fuzz(root_url: str, headers: dict[str, str], max_examples: int, seed: int = 0) -> FuzzStats:
    """Send `max_examples` positive and as many negative cases to every operation of the schema."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed as hseed, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(root_url + "/openapi.json", headers=headers)
    stats = FuzzStats()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:
            @hseed(seed)
            @settings(max_examples=max_examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def send(case: schemathesis.Case) -> None:
                stats.cases += 1
                where = f"{case.method} {case.formatted_path} ({mode.value})"
                try:
                    response = case.call(base_url=root_url, session=session, headers=headers, timeout=30)
                except requests.RequestException as exc:
                    stats.failures.append(f"{where}: no answer ({type(exc).__name__})")
                    return
                stats.statuses[response.status_code] += 1
                if response.status_code >= 500:
                    stats.failures.append(f"{where}: {response.status_code} {response.text[:200]}")

            try:
                send()
            except Unsatisfiable:  # nothing to make invalid (an operation without parameters)
                pass
    return stats
