"""Evaluate candidates on Ray actors, so a search spreads over every core, GPU and node it has.

Each actor builds its evaluator once with the factory (a resident model for ``local``, a client
for ``api``) and then scores many candidates. One driver thread per actor takes the next job
from a shared queue as soon as its actor is free, so no worker waits for the others (the
scheduler keeps ``workers`` jobs in flight; there is no generation barrier here).

Why a thread per actor rather than one dispatcher over `ray.wait`: each thread owns exactly one
actor and one job at a time, so "which candidate was this dead actor running" needs no shared
bookkeeping, a blocking `ray.get` wakes the moment a result lands (no polling interval), and the
timeout of one candidate is the timeout of one `ray.get`.

Failures never escape as exceptions: an actor that dies mid-candidate (killed, out of memory,
a crash in native code) is replaced and the candidate retried up to ``max_retries`` times, then
resolved as a failed `Score`; a candidate running past ``eval_timeout`` has its actor killed and
replaced, and resolves as failed. A paid candidate (one with a spend `limit`) is not retried
after a death: what the dead attempt spent is unknown, so it resolves as failed at its whole
limit, and the scheduler's ledger decides whether anything more may be spent.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import evomerge
from evomerge._imports import require
from evomerge.backends._base import Evaluator, EvaluatorFactory, scores_many
from evomerge.errors import ConfigError
from evomerge.recipe import MergeRecipe
from evomerge.scheduler._base import Job, QueueExecutor
from evomerge.score import Score, attempt, attempt_batch

log = logging.getLogger(__name__)

SHUTDOWN_ERROR = "the executor was shut down before this evaluation finished"


class _EvalActor:
    """The body of one Ray actor: holds one evaluator built where the actor runs."""

    def __init__(self, factory: EvaluatorFactory) -> None:
        self._evaluate: Evaluator = factory()

    def ready(self) -> int:
        """Returns once the evaluator is built (the pid, for tests and logs)."""
        return os.getpid()

    def batches(self) -> bool:
        """Whether the evaluator scores several candidates at once (`many`: a population forward)."""
        return scores_many(self._evaluate)

    def evaluate(self, recipe: MergeRecipe, split: str, options: dict[str, Any]) -> Score:
        return attempt(self._evaluate, recipe, split, **options)

    def many(self, recipes: list[MergeRecipe], split: str) -> list[Score]:
        evaluator = self._evaluate
        assert scores_many(evaluator)  # the executor batches only where `batches` said so
        return attempt_batch(lambda: evaluator.many(recipes, split), len(recipes))


def _reason(exc: BaseException) -> str:
    """One line saying why: the root exception of a failed actor start, else the error's first line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if getattr(exc, "_actor_init_failed", False) or "creation task" in lines[0]:
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0]}"


def connect(address: str | None = None) -> bool:
    """Attach to Ray: the running session, else `address` or RAY_ADDRESS, else a new local Ray.

    Returns whether this call initialised Ray (and so whoever called it should shut it down).
    """
    ray = require("ray", "evaluation on Ray workers (workers=N)", "ray[default]")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        with worker_pythonpath(str(Path(evomerge.__file__).resolve().parent.parent)):
            ray.init(include_dashboard=False)
    return True


@contextmanager
def worker_pythonpath(*paths: str) -> Iterator[None]:
    """Put `paths` first on PYTHONPATH while a local Ray starts, so its workers (which inherit
    the environment) import evomerge and user modules from where this driver does, installed or
    not. Cheaper than a runtime_env, which starts every worker through Ray's env agent."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, (old or "").split(os.pathsep))])
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def _secrets(factory: EvaluatorFactory) -> dict[str, Any]:
    """The actor option that hands the factory's secrets (`secret_env`: names of environment
    variables, such as the api key's) to its actors, the way Ray passes secrets: as env vars of
    their runtime_env, so a worker on a node started without the key has it, while the key stays
    out of the pickled factory, the journal and every log line. Only variables set here are passed."""
    names = getattr(factory, "secret_env", ())
    env = {name: os.environ[name] for name in names if os.environ.get(name)}
    return {"runtime_env": {"env_vars": env}} if env else {}


def actor_resources(workers: int, num_gpus: float | None, num_cpus: float | None) -> tuple[float, float]:
    """(num_cpus, num_gpus) per actor: one GPU each where the cluster has GPUs, and a CPU share
    small enough that `workers` actors fit (evaluations wait on I/O or a GPU, not on the CPU)."""
    ray = require("ray", "evaluation on Ray workers (workers=N)", "ray[default]")
    total = ray.cluster_resources()
    if num_gpus is None:
        num_gpus = 1.0 if total.get("GPU", 0.0) >= 1.0 else 0.0
    if num_cpus is None:
        # Ray accepts four decimals; round down so the shares never sum above the total.
        num_cpus = min(1.0, math.floor(total.get("CPU", 1.0) / workers * 1e4) / 1e4) or 1e-4
    if num_gpus and num_gpus * workers > total.get("GPU", 0.0):
        log.warning("%d workers × %g GPU exceed the cluster's %g GPUs; some workers wait for a GPU",
                    workers, num_gpus, total.get("GPU", 0.0))
    return num_cpus, num_gpus


class RayExecutor(QueueExecutor):
    """Runs evaluations on `workers` Ray actors. Invariant: every submitted future resolves to a
    Score (failures included); only `shutdown` cancels the futures still queued.

    Each actor takes one GPU where the cluster has GPUs, unless `num_gpus_per_worker` says
    otherwise or the factory declares ``uses_gpu = False`` (a provider client needs none).
    """

    name = "Ray executor"

    def __init__(self, factory: EvaluatorFactory, workers: int, eval_timeout: float | None = None,
                 max_retries: int = 2, address: str | None = None,
                 num_gpus_per_worker: float | None = None, num_cpus_per_worker: float | None = None) -> None:
        if workers < 1:
            raise ConfigError(f"workers is {workers}; give at least 1")
        super().__init__(eval_timeout)
        if max_retries < 0:
            raise ConfigError(f"max_retries is {max_retries}; give 0 or more")
        self._ray = require("ray", "evaluation on Ray workers (workers=N)", "ray[default]")
        self.workers = workers
        self.max_retries = max_retries
        self._owns_ray = connect(address)
        if num_gpus_per_worker is None and not getattr(factory, "uses_gpu", True):
            num_gpus_per_worker = 0.0  # an api client or a plain fitness leaves the GPUs free
        cpus, gpus = actor_resources(workers, num_gpus_per_worker, num_cpus_per_worker)
        self._actor_class = self._ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0,
                                             **_secrets(factory))(_EvalActor)
        errors = self._ray.exceptions
        self._lost = (errors.RayActorError, errors.OutOfMemoryError, errors.NodeDiedError,
                      errors.WorkerCrashedError, errors.ObjectLostError)
        """What a dead worker raises (killed, out of memory, its node gone): replace and retry."""
        self._factory = self._ray.put(factory)  # pickled once, however many actors start
        self._started = threading.Condition(self._lock)
        self._actors: list[Any] = [None] * workers
        self._live = [False] * workers
        self._batches = [False] * workers  # whether slot i's evaluator takes several candidates at once
        self.restarts = 0
        """Actors replaced after a death or a timeout (for tests and logs)."""
        self._threads = [threading.Thread(target=self._drive, args=(i,), name=f"evomerge-ray-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every worker's evaluator is built (benchmarks exclude start-up); False on timeout."""
        with self._started:
            return self._started.wait_for(lambda: self._closed or all(self._live), timeout)

    def shutdown(self) -> None:
        """Kill the actors, cancel queued jobs, fail running ones; stop Ray if this executor started it."""
        if not self._close():
            return
        for _ in self._threads:
            self._jobs.put(None)
        for index in range(self.workers):
            self._kill(index)
        for thread in self._threads:
            thread.join(timeout=30)
        if self._owns_ray:
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- one driver thread per actor -------------------------------------------------------

    def _drive(self, index: int) -> None:
        """Keep slot `index` warm: (re)start its actor before taking the next job, not after."""
        start_error = self._start(index)
        carry: Job | None = None
        while (job := carry or self._jobs.get()) is not None:
            batch, carry = self._batch(job, self._batches[index])
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            for j, score in zip(batch, self._run(index, batch, start_error), strict=True):
                j.future.set_result(score)
            start_error = self._start(index) if self._actors[index] is None and not self._closed else None

    def _start(self, index: int) -> str | None:
        """Start slot `index`'s actor and wait until its evaluator is built; the error, if any."""
        actor = self._actor_class.remote(self._factory)
        with self._lock:
            if self._closed:
                self._ray.kill(actor, no_restart=True)
                return SHUTDOWN_ERROR
            self._actors[index] = actor
        try:
            self._ray.get(actor.ready.remote())
            self._batches[index] = self._ray.get(actor.batches.remote())
        except self._ray.exceptions.RayError as exc:
            self._actors[index] = None
            if self._closed:
                return SHUTDOWN_ERROR
            log.warning("Ray worker %d could not start: %s", index, _reason(exc))
            return f"the worker could not start: {_reason(exc)}"
        with self._started:
            self._live[index] = True
            self._started.notify_all()
        return None

    def _run(self, index: int, batch: list[Job], start_error: str | None) -> list[Score]:
        """Evaluate one job, or several of one split through the actor's `many`, on slot `index`,
        replacing a dead actor and retrying up to the limit (a batch has the time of its jobs).
        A failed start before the job (`start_error`) counts as its first attempt."""
        errors: list[str] = []
        job = batch[0]
        for _ in range(1 + self.max_retries):
            if self._closed:
                return [Score.failed(SHUTDOWN_ERROR)] * len(batch)
            if self._actors[index] is None:
                error, start_error = start_error or self._start(index), None
                if error:
                    errors.append(error)
                    continue
            actor = self._actors[index]
            ref = (actor.evaluate.remote(job.recipe, job.split, job.options) if len(batch) == 1
                   else actor.many.remote([j.recipe for j in batch], job.split))
            try:
                timeout = None if self.eval_timeout is None else self.eval_timeout * len(batch)
                result = self._ray.get(ref, timeout=timeout)
                return [result] if len(batch) == 1 else result
            except self._ray.exceptions.GetTimeoutError:
                self._replace(index, "timed out")
                return [self._timed_out(j, "the worker was restarted") for j in batch]
            except self._lost as exc:
                self._replace(index, "died")
                errors.append(f"the worker died: {_reason(exc)}")
                if job.limit is not None:  # a paid job is always alone
                    return [job.unknown_spend(f"{errors[-1]}; a paid evaluation is not retried (its spend is unknown)")]
            except self._ray.exceptions.RayError as exc:  # e.g. a Score that cannot be unpickled
                return [Score.failed(_reason(exc))] * len(batch)
        if self._closed:
            return [Score.failed(SHUTDOWN_ERROR)] * len(batch)
        return [Score.failed(f"gave up after {len(errors)} attempt(s); last: {errors[-1]}")] * len(batch)

    def _replace(self, index: int, why: str) -> None:
        if self._closed:
            return
        log.warning("Ray worker %d %s; starting a fresh one", index, why)
        self._kill(index)
        with self._lock:
            self.restarts += 1

    def _kill(self, index: int) -> None:
        with self._lock:
            actor, self._actors[index] = self._actors[index], None
            self._live[index] = False
        if actor is not None:
            try:
                self._ray.kill(actor, no_restart=True)
            except self._ray.exceptions.RayError as exc:  # already gone; nothing else holds it
                log.debug("killing Ray worker %d: %s", index, _reason(exc))
