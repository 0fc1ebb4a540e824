"""The executor contract the scheduler drives: submit (recipe, split), get a future Score.

Any executor fits: threads in this process, or Ray actors on a cluster. Backends are built by a
picklable factory inside each worker, so they load once and evaluate many candidates.
A paid evaluation also carries its `limit` (the spend the ledger reserved for it, enforced by the
evaluator) and racing's `prior` (the candidate's minibatch score, so a finish on any worker pays
only for the examples the minibatch did not score); the evaluator receives them as keywords.
An evaluator with a `many(recipes, split) -> [Score]` method (the local backend's population
path) is handed the queued candidates of one split together, so an asked-ahead window shares
batched forwards; paid or raced jobs (with options) always go alone.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Protocol

from evomerge.errors import BackendError, ConfigError
from evomerge.recipe import MergeRecipe
from evomerge.score import Cost, Score


class Executor(Protocol):
    """Runs evaluations. Invariant: every future resolves to a Score (failures included);
    a future never raises, except when the executor is shut down."""

    workers: int

    def submit(self, recipe: MergeRecipe, split: str, limit: Cost | None = None,
               prior: Score | None = None) -> Future[Score]: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class Job:
    """A submitted evaluation waiting in an executor's queue."""

    recipe: MergeRecipe
    split: str
    future: Future[Score]
    limit: Cost | None = None
    prior: Score | None = None

    @property
    def options(self) -> dict[str, Any]:
        """The evaluator's keywords: only those set, so an unpaid evaluator never sees them."""
        return {k: v for k, v in (("limit", self.limit), ("prior", self.prior)) if v is not None}

    def unknown_spend(self, error: str) -> Score:
        """The failed score of an attempt whose spend is unknown (timed out, its worker dead): it
        may have spent its whole limit, so that is its cost."""
        return Score.failed(error, self.limit or Cost())


MAX_BATCH = 64
"""Most candidates one worker takes together for an evaluator with `many` (a population forward)."""


class QueueExecutor:
    """What the thread and Ray executors share: their worker threads take `Job`s from one queue,
    `submit` refuses work once shutdown has begun, and a candidate past `eval_timeout` is failed
    with the same kind of score whatever the executor does to the worker that ran it."""

    name = "executor"
    """How `submit`'s refusal names this executor."""

    def __init__(self, eval_timeout: float | None) -> None:
        if eval_timeout is not None and not eval_timeout > 0:
            raise ConfigError(f"eval_timeout is {eval_timeout}; give a positive number of seconds or None")
        self.eval_timeout = eval_timeout
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, recipe: MergeRecipe, split: str, limit: Cost | None = None,
               prior: Score | None = None) -> Future[Score]:
        future: Future[Score] = Future()
        with self._lock:
            if self._closed:
                raise BackendError(f"this {self.name} is shut down; create a new one to evaluate more")
            self._jobs.put(Job(recipe, split, future, limit, prior))
        return future

    def _batch(self, first: Job, batches: bool) -> tuple[list[Job], Job | None]:
        """`first` and, for an evaluator that scores many candidates at once (`batches`), the
        queued jobs behind it of the same split and no options, up to `MAX_BATCH`; also the job
        taken that does not fit (the worker runs it next) or a shutdown marker, put back."""
        batch = [first]
        if not batches or first.options:
            return batch, None
        while len(batch) < MAX_BATCH:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._jobs.put(None)
                break
            if job.split != first.split or job.options:
                return batch, job
            batch.append(job)
        return batch, None

    def _close(self) -> bool:
        """Refuse new jobs and cancel the queued ones; False when shutdown had already begun."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return True
            if job is not None:
                job.future.cancel()

    def _timed_out(self, job: Job, consequence: str) -> Score:
        """The failed score of a candidate past `eval_timeout`: it cost the timeout, and its whole
        limit (what it went on spending after it was given up is not known)."""
        score = job.unknown_spend(f"timed out after {self.eval_timeout:g}s; {consequence}")
        return replace(score, cost=replace(score.cost, seconds=float(self.eval_timeout or 0.0)))
