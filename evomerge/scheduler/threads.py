"""The in-process executor: worker threads that each build their evaluator once.

Threads suit I/O-bound backends (the api client) and the python backend; Ray actors are the
executor for CPU/GPU-bound work. Both satisfy the same `Executor` protocol, `eval_timeout`
included: Python cannot stop a thread, so a candidate past its time is failed at once and its
thread abandoned to finish on its own (its late result is dropped, its evaluator freed only then);
a fresh thread with a fresh evaluator takes its place, so a hung provider call costs one
candidate, not the search.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from evomerge.backends._base import EvaluatorFactory
from evomerge.scheduler._base import Job, QueueExecutor
from evomerge.score import Score


class ThreadExecutor(QueueExecutor):
    """Runs evaluations on `workers` threads; each thread calls `factory()` once."""

    name = "thread executor"

    def __init__(self, factory: EvaluatorFactory, workers: int = 1, eval_timeout: float | None = None) -> None:
        super().__init__(eval_timeout)
        self.workers = max(1, int(workers))
        self._factory = factory
        self._threads: set[threading.Thread] = set()   # live, not abandoned
        self._running: dict[Future[Score], tuple[threading.Thread, Job]] = {}
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
                self._running[future] = (threading.current_thread(), job)
            timer = None
            if self.eval_timeout is not None:
                timer = threading.Timer(self.eval_timeout, self._expire, (future,))
                timer.daemon = True
                timer.start()
            try:
                evaluator = evaluator or self._factory()
                score = evaluator(job.recipe, job.split, **job.options)
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
            running = self._running.pop(future, None)
            if running is None:  # finished just in time
                return
            thread, job = running
            self._threads.discard(thread)
            future.set_result(self._timed_out(job, "its thread was abandoned and replaced"))
            if not self._closed:
                self._start_thread()

    def shutdown(self) -> None:
        """Cancel what has not started, let running candidates finish (or time out), stop the threads."""
        if not self._close():
            return
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join(self.eval_timeout)  # one that times out meanwhile is abandoned, not waited for
