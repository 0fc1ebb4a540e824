"""The in-process executor: a thread pool whose threads each build their evaluator once.

Threads suit I/O-bound backends (the api client) and the python backend; Ray actors are the
executor for CPU/GPU-bound work. Both satisfy the same `Executor` protocol.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from evomerge.backends._base import Evaluator, EvaluatorFactory
from evomerge.recipe import MergeRecipe
from evomerge.score import Score


class ThreadExecutor:
    """Runs evaluations on `workers` threads; each thread calls `factory()` once."""

    def __init__(self, factory: EvaluatorFactory, workers: int = 1) -> None:
        self.workers = max(1, int(workers))
        self._factory = factory
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="evomerge-eval")

    def _evaluator(self) -> Evaluator:
        ev = getattr(self._local, "evaluator", None)
        if ev is None:
            ev = self._local.evaluator = self._factory()
        return ev

    def _run(self, recipe: MergeRecipe, split: str) -> Score:
        try:
            return self._evaluator()(recipe, split)
        except Exception as exc:  # an evaluator that raises is a failed candidate, not a crash
            return Score.failed(f"{type(exc).__name__}: {exc}")

    def submit(self, recipe: MergeRecipe, split: str) -> "Future[Score]":
        return self._pool.submit(self._run, recipe, split)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
