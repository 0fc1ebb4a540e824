"""The executor contract the scheduler drives: submit (recipe, split), get a future Score.

Any executor fits: threads in this process, or Ray actors on a cluster. Backends are built by a
picklable factory inside each worker, so they load once and evaluate many candidates.
"""

from __future__ import annotations

import queue
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from evomerge.recipe import MergeRecipe
from evomerge.score import Score


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


def cancel_queued(jobs: "queue.Queue[Job | None] | queue.SimpleQueue[Job | None]") -> None:
    """Cancel every job still waiting in `jobs` (at shutdown); stop sentinels are dropped."""
    while True:
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            return
        if job is not None:
            job.future.cancel()
