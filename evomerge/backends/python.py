"""The python backend: any callable that takes a recipe and returns a loss (or a dict with
``loss`` and metrics) becomes a backend, so evomerge works as a library with a user's fitness."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.backends._base import Backend, Evaluator, Prepared, Weights, register_backend
from evomerge.errors import ConfigError
from evomerge.recipe import MergeRecipe
from evomerge.score import Cost, Score
from evomerge.tasks import Example

if TYPE_CHECKING:
    from evomerge.config import SearchConfig

Fitness = Callable[[MergeRecipe], Any]


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


@register_backend("python")
@dataclass(frozen=True)
class PythonEvaluatorFactory:
    """Builds the evaluator of a fitness callable inside a worker (picklable if the callable is)."""

    fitness: Fitness
    splits = None  # a fitness brings its own data
    has_validation = False
    uses_gpu = True
    weights = Weights()

    @classmethod
    def from_config(cls, config: SearchConfig, stack: ExitStack, resume: bool = False) -> Prepared:
        """The --fitness MODULE:CALLABLE (default: the built-in demo) over the configured experts."""
        from evomerge import demo

        fitness = load_fitness(config.fitness) if config.fitness else demo.demo_fitness
        return Prepared(tuple(config.experts or demo.EXPERTS), cls(fitness))

    def fingerprint(self) -> dict[str, Any]:
        """The backend only: a callable's name does not fix its scores (its code may change under
        the same name, or stay under another), so resuming trusts the user for the fitness."""
        return {"backend": "python"}

    def __call__(self) -> Evaluator:
        backend = PythonBackend(self.fitness)
        return lambda recipe, split: backend.evaluate(recipe, ())


def load_fitness(spec: str) -> Fitness:
    """Import 'module:callable' (the module may be a path to a .py file)."""
    if ":" not in spec:
        raise ConfigError(f"--fitness {spec!r} must look like MODULE:CALLABLE, e.g. mypkg.fitness:loss")
    module_name, attr = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            spec_obj = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec_obj is None or spec_obj.loader is None:
                raise ImportError(f"cannot load {module_name}")
            module = importlib.util.module_from_spec(spec_obj)
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, OSError) as exc:
        raise ConfigError(f"cannot import fitness module {module_name!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{module_name!r} has no callable {attr!r}; check the --fitness MODULE:CALLABLE")
    return fn
