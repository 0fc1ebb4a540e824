"""Kill Ray worker processes at random from the driver while `evomerge.search` runs on them.

The fitness reports the pid of the worker that ran it, so the driver learns the live workers'
pids from the journaled trials and SIGKILLs one now and then, mid-candidate (each takes
`EVAL_SECONDS`). Shared by tests/faults/test_ray_kills.py and benchmarks/reliability.py.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import evomerge
from evomerge.api import SearchResult
from evomerge.journal import Trial
from evomerge.recipe import MergeRecipe
from evomerge.search_spaces import build_space

EVAL_SECONDS = 0.15


def squares_where(recipe: MergeRecipe) -> dict[str, float]:
    """Σw² (the known loss), and which worker process computed it."""
    time.sleep(EVAL_SECONDS)
    return {"loss": float(sum(w * w for w in recipe.weights)), "pid": float(os.getpid())}


class Killer:
    """A driver thread that SIGKILLs a known, live worker every `every` seconds (at random), `kills` times."""

    def __init__(self, kills: int, every: float, seed: int) -> None:
        self.kills, self.every = kills, every
        self.pids: set[int] = set()
        self.killed: list[int] = []
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ray-killer")

    def seen(self, trial: Trial) -> None:
        pid = trial.score.metrics.get("pid")
        if pid is not None:
            self.pids.add(int(pid))

    def _run(self) -> None:
        while len(self.killed) < self.kills and not self._stop.wait(self._rng.uniform(0.5, 1.5) * self.every):
            live = sorted(p for p in self.pids - set(self.killed) if _alive(p))
            if live:
                pid = self._rng.choice(live)
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)

    def __enter__(self) -> "Killer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def search_with_kills(journal: Path, budget: int, kills: int, seed: int = 0, workers: int = 3) -> tuple[
        SearchResult, Killer]:
    """A seeded search on `workers` Ray actors while `kills` of them are killed at random."""
    space = build_space("linear", ["a", "b", "c", "d"])
    every = EVAL_SECONDS * budget / workers / (kills + 1)
    with Killer(kills, every, seed) as killer:
        result = evomerge.search(squares_where, space, budget=budget, seed=seed, workers=workers, executor="ray",
                                 journal=journal, on_trial=killer.seen)
    return result, killer
