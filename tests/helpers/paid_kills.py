"""`kill -9` a real `evomerge search --backend api` at random points and `--resume` it, against a
real provider behind the fault proxy: what the provider served, what the journal's ledger holds
and what each kill left in flight. Shared by tests/faults/test_spend_ledger.py and
benchmarks/reliability.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from evomerge.api import PROBE_STAGE
from tests.helpers.api_search import EXAMPLES, KEY_ENV, VALIDATION, ledger_queries, served, settle
from tests.helpers.crash import ROOT, paid
from tests.helpers.fault_proxy import FAULTS, FaultProxy


@dataclass(frozen=True)
class Campaign:
    """One search killed `len(in_flight)` times and resumed to its end."""

    served: int
    """Queries the provider itself counted (its /v1/stats), probe included."""
    ledger: int
    """The journal's ledger: recorded costs plus reservations left open (kills and the probe)."""
    in_flight: list[int]
    """Queries reserved and still open at each kill: what the ledger may hold beyond `served`."""
    duplicates: int
    """Paid evaluations journaled twice (the same stage, trial and split, or recipe and split)."""
    paid: int
    returncode: int
    stderr: str


def _config(tmp: Path, url: str, budget: int, max_queries: int, workers: int, race: float | None,
            ray_address: str | None) -> Path:
    """The search's YAML config: the fault suite's examples as a task file, the proxy as provider."""
    tasks = tmp / "task.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer, "id": e.id}) + "\n"
                             for e in EXAMPLES + VALIDATION))
    config = {"backend": "api", "budget": budget, "seed": 3, "journal": str(tmp / "run.sqlite"),
              "max_queries": max_queries, "workers": workers, "batch_size": 4, "test_table": "none",
              "executor": "ray" if ray_address else "threads", "ray_address": ray_address,
              "task": {"files": [str(tasks)], "validation": 0.25},
              "api": {"base": url, "key_env": KEY_ENV, "timeout": 1.5, "max_retries": 2, "provider": "evomerge"},
              "race": None if race is None else {"fraction": race, "warmup": 3}}
    path = tmp / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _start(config: Path, resume: bool, key: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{KEY_ENV: key})
    args = [sys.executable, "-m", "evomerge", "search", "--config", str(config), "--no-progress"]
    return subprocess.Popen(args + (["--resume"] if resume else []), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def open_queries(journal: Path) -> int:
    """Queries held by reservations not yet closed, the probe's spend apart."""
    try:
        with sqlite3.connect(journal, timeout=5) as conn:
            return int(conn.execute("SELECT COALESCE(SUM(queries), 0) FROM spend WHERE stage != ?",
                                    (PROBE_STAGE,)).fetchone()[0])
    except sqlite3.Error:
        return 0


def duplicates(journal: Path) -> int:
    with sqlite3.connect(journal) as conn:
        rows = conn.execute("SELECT stage, trial, split, recipe_key, status FROM evaluations WHERE cached = 0").fetchall()
    ok = [(r[3], r[2]) for r in rows if r[4] == "ok"]
    return (len(rows) - len({r[:3] for r in rows})) + (len(ok) - len(set(ok)))


def kill_and_resume(server_url: str, key: str, tmp: Path, rate: float, kills: int, seed: int, budget: int = 40,
                    max_queries: int = 120, workers: int = 2, race: float | None = None,
                    ray_address: str | None = None, timeout: float = 240.0) -> Campaign:
    """Run the search through faults at `rate`, SIGKILL it `kills` times at random moments (each once
    some evaluations are paid, at once if requests are in flight), resume it to the end."""
    rng = random.Random(seed)
    before = served(server_url, key)
    rates = {fault: rate / len(FAULTS) for fault in FAULTS}
    journal = tmp / "run.sqlite"
    in_flight: list[int] = []
    with FaultProxy(server_url, rates=rates, seed=seed, delay=2.5, retry_after=0.05) as proxy:
        config = _config(tmp, proxy.base_url, budget, max_queries, workers, race, ray_address)
        for k in range(kills + 1):
            held = open_queries(journal)
            proc = _start(config, resume=k > 0, key=key)
            if k == kills:
                out, err = proc.communicate(timeout=timeout)
                break
            after = paid(journal) + rng.randint(1, 2)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline and (
                    paid(journal) < after or open_queries(journal) <= held):
                time.sleep(rng.uniform(0.001, 0.02))
            if proc.poll() is not None:  # it finished before this kill point: nothing left to kill
                out, err = proc.communicate()
                break
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            in_flight.append(open_queries(journal) - held)
        settle(proxy)
    return Campaign(served(server_url, key) - before, ledger_queries(journal), in_flight, duplicates(journal),
                    paid(journal), proc.returncode, err)
