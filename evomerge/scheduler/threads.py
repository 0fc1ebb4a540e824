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

from evomerge.backends._base import Evaluator, EvaluatorFactory, scores_many
from evomerge.scheduler._base import Job, QueueExecutor
from evomerge.score import Score, attempt, attempt_batch


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
        carry: Job | None = None
        while (job := carry or self._jobs.get()) is not None:
            try:
                evaluator = evaluator or self._factory()
            except Exception as exc:  # an evaluator that cannot be built fails this candidate, not the search
                carry = None
                if job.future.set_running_or_notify_cancel():
                    job.future.set_result(Score.from_exception(exc))
                continue
            batch, carry = self._batch(job, scores_many(evaluator))
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if batch and not self._run(evaluator, batch):
                return

    def _run(self, evaluator: Evaluator, batch: list[Job]) -> bool:
        """Score `batch` (one job, or several together through `evaluator.many`) and resolve its
        futures; False when it timed out meanwhile and a fresh thread took this one's place."""
        with self._lock:
            for job in batch:
                self._running[job.future] = (threading.current_thread(), job)
        timer = None
        if self.eval_timeout is not None:  # a batch of n candidates has the time of n
            timer = threading.Timer(self.eval_timeout * len(batch), self._expire, [j.future for j in batch])
            timer.daemon = True
            timer.start()
        if len(batch) > 1 and scores_many(evaluator):  # a batch forms only for such an evaluator
            scores = attempt_batch(lambda: evaluator.many([j.recipe for j in batch], batch[0].split), len(batch))
        else:
            scores = [attempt(evaluator, batch[0].recipe, batch[0].split, **batch[0].options)]
        if timer is not None:
            timer.cancel()
        with self._lock:
            if any(self._running.pop(job.future, None) is None for job in batch):
                return False  # timed out: a fresh thread took this one's place
            for job, score in zip(batch, scores, strict=True):
                job.future.set_result(score)
        return True

    def _expire(self, *futures: Future[Score]) -> None:
        with self._lock:
            running = [r for r in map(self._running.pop, futures, [None] * len(futures)) if r is not None]
            if not running:  # finished just in time
                return
            self._threads.discard(running[0][0])
            for _, job in running:
                job.future.set_result(self._timed_out(job, "its thread was abandoned and replaced"))
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
