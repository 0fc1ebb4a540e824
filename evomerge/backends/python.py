"""The python backend: any callable that takes a recipe and returns a loss (or a dict with
``loss`` and metrics) becomes a backend, so evomerge works as a library with a user's fitness."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

from evomerge.backends._base import Backend, Evaluator, register_backend
from evomerge.recipe import MergeRecipe
from evomerge.score import Cost, Score
from evomerge.tasks import Example

Fitness = Callable[[MergeRecipe], Any]


@register_backend("python")
class PythonBackend(Backend):
    """Wraps a fitness callable. A NaN, a non-number or an exception marks the candidate failed."""

    def __init__(self, fitness: Fitness) -> None:
        self.fitness = fitness

    def _evaluate(self, recipe: MergeRecipe, examples: Sequence[Example], **options: Any) -> Score:
        """`options` (a spend limit, a racing prior) are for paid backends; the fitness is called as is."""
        out = self.fitness(recipe)
        metrics: dict[str, float] = {}
        cost = Cost()
        if isinstance(out, dict):
            if "loss" not in out:
                return Score.failed("fitness returned a dict without a 'loss' key")
            metrics = {k: float(v) for k, v in out.items()
                       if k not in ("loss", "queries", "tokens") and isinstance(v, Real)}
            cost = Cost(int(out.get("queries", 0)), int(out.get("tokens", 0)))
            out = out["loss"]
        if isinstance(out, bool) or not isinstance(out, Real):
            return Score.failed(f"fitness returned {type(out).__name__}, not a number")
        loss = float(out)
        if not math.isfinite(loss):
            return Score.failed(f"fitness returned {loss}")
        return Score(loss=loss, metrics=metrics, cost=cost)


@dataclass(frozen=True)
class PythonEvaluatorFactory:
    """Builds the evaluator of a fitness callable inside a worker (picklable if the callable is)."""

    fitness: Fitness

    def __call__(self) -> Evaluator:
        backend = PythonBackend(self.fitness)
        return lambda recipe, split: backend.evaluate(recipe, ())
