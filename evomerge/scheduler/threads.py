"""The in-process executor: worker threads that each build their evaluator once.

Threads suit I/O-bound backends (the api client) and the python backend; Ray actors are the
executor for CPU/GPU-bound work. Both satisfy the same `Executor` protocol, `eval_timeout`
included: Python cannot stop a thread, so a candidate past its time is failed at once and its
thread abandoned to finish on its own (its late result is dropped, its evaluator freed only then);
a fresh thread with a fresh evaluator takes its place, so a hung provider call costs one
candidate, not the search.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

from evomerge.backends._base import EvaluatorFactory
from evomerge.errors import BackendError, ConfigError
from evomerge.recipe import MergeRecipe
from evomerge.scheduler._base import Job, cancel_queued
from evomerge.score import Cost, Score


class ThreadExecutor:
    """Runs evaluations on `workers` threads; each thread calls `factory()` once."""

    def __init__(self, factory: EvaluatorFactory, workers: int = 1, eval_timeout: float | None = None) -> None:
        if eval_timeout is not None and not eval_timeout > 0:
            raise ConfigError(f"eval_timeout is {eval_timeout}; give a positive number of seconds or None")
        self.workers = max(1, int(workers))
        self.eval_timeout = eval_timeout
        self._factory = factory
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()   # live, not abandoned
        self._running: dict[Future[Score], threading.Thread] = {}
        self._closed = False
        for _ in range(self.workers):
            self._start_thread()

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._work, name="evomerge-eval", daemon=True)
        self._threads.add(thread)
        thread.start()

    def _work(self) -> None:
        evaluator = None
        while (job := self._jobs.get()) is not None:
            future = job.future
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._running[future] = threading.current_thread()
            timer = None
            if self.eval_timeout is not None:
                timer = threading.Timer(self.eval_timeout, self._expire, (future,))
                timer.daemon = True
                timer.start()
            try:
                evaluator = evaluator or self._factory()
                score = evaluator(job.recipe, job.split)
            except Exception as exc:  # an evaluator that raises is a failed candidate, not a crash
                score = Score.failed(f"{type(exc).__name__}: {exc}")
            if timer is not None:
                timer.cancel()
            with self._lock:
                if self._running.pop(future, None) is None:  # timed out: a fresh thread took this one's place
                    return
                future.set_result(score)

    def _expire(self, future: "Future[Score]") -> None:
        with self._lock:
            thread = self._running.pop(future, None)
            if thread is None:  # finished just in time
                return
            self._threads.discard(thread)
            future.set_result(Score.failed(f"timed out after {self.eval_timeout:g}s; its thread was abandoned "
                                           "and replaced", Cost(seconds=float(self.eval_timeout or 0.0))))
            if not self._closed:
                self._start_thread()

    def submit(self, recipe: MergeRecipe, split: str) -> "Future[Score]":
        future: Future[Score] = Future()
        with self._lock:
            if self._closed:
                raise BackendError("this thread executor is shut down; create a new one to evaluate more")
            self._jobs.put(Job(recipe, split, future))
        return future

    def shutdown(self) -> None:
        """Cancel what has not started, let running candidates finish (or time out), stop the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        cancel_queued(self._jobs)
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join(self.eval_timeout)  # one that times out meanwhile is abandoned, not waited for
