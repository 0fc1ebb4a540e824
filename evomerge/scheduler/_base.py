"""The executor contract the scheduler drives: submit (recipe, split), get a future Score.

Any executor fits: threads in this process, or Ray actors on a cluster. Backends are built by a
picklable factory inside each worker, so they load once and evaluate many candidates.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from evomerge.errors import BackendError, ConfigError
from evomerge.recipe import MergeRecipe
from evomerge.score import Cost, Score


class Executor(Protocol):
    """Runs evaluations. Invariant: every future resolves to a Score (failures included);
    a future never raises, except when the executor is shut down."""

    workers: int

    def submit(self, recipe: MergeRecipe, split: str) -> "Future[Score]": ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class Job:
    """A submitted evaluation waiting in an executor's queue."""

    recipe: MergeRecipe
    split: str
    future: "Future[Score]"


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

    def submit(self, recipe: MergeRecipe, split: str) -> "Future[Score]":
        future: Future[Score] = Future()
        with self._lock:
            if self._closed:
                raise BackendError(f"this {self.name} is shut down; create a new one to evaluate more")
            self._jobs.put(Job(recipe, split, future))
        return future

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

    def _timed_out(self, consequence: str) -> Score:
        """The failed score of a candidate past `eval_timeout`; it cost the timeout."""
        return Score.failed(f"timed out after {self.eval_timeout:g}s; {consequence}",
                            Cost(seconds=float(self.eval_timeout or 0.0)))
