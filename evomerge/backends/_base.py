"""The backend contract: score a recipe on examples, return a `Score`, never raise.

A backend never sees the optimizer; it receives plain recipes and examples. Subclasses implement
`_evaluate`; `evaluate` turns any exception into a failed `Score`, so one bad candidate is
recorded as failed and the search goes on (mergekit-evolve's `{"score": None}` ended whole runs).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any, Callable, ClassVar, Sequence

from evomerge.errors import ConfigError
from evomerge.recipe import MergeRecipe
from evomerge.score import Score, attempt
from evomerge.tasks import Example

Evaluator = Callable[[MergeRecipe, str], Score]
"""What the scheduler calls: (recipe, split name) -> Score."""

EvaluatorFactory = Callable[[], Evaluator]
"""A picklable zero-argument callable that builds an evaluator where it runs (a thread, a Ray actor)."""


class Backend(ABC):
    """Scores recipes. Invariant: `evaluate` returns a Score for every input, failures included."""

    name: ClassVar[str]

    def evaluate(self, recipe: MergeRecipe, examples: Sequence[Example], **options: Any) -> Score:
        """Score `recipe` on `examples`; `options` are what a paid backend takes from the scheduler
        (its spend `limit`, racing's `prior`)."""
        start = time.perf_counter()
        score = attempt(self._evaluate, recipe, examples, **options)
        if score.cost.seconds == 0.0:  # a backend that does not time itself is timed here
            score = replace(score, cost=replace(score.cost, seconds=time.perf_counter() - start))
        return score

    @abstractmethod
    def _evaluate(self, recipe: MergeRecipe, examples: Sequence[Example], **options: Any) -> Score:
        """Score `recipe` on `examples`; may raise, `evaluate` records the failure."""

    def close(self) -> None:
        """Release what the backend holds (models, connections)."""


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(name: str) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator: make a backend available under `name` (what users type in YAML)."""

    def deco(cls: type[Backend]) -> type[Backend]:
        if name in BACKENDS:
            raise ConfigError(f"backend name {name!r} is registered twice")
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return deco
