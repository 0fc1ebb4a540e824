"""nevergrad's optimizers (NGOpt, CMA, TwoPointsDE, PSO, OnePlusOne, ...) behind evomerge's ask/tell.

The box is an `ng.p.Array` started at x0 with mutation σ0, bounded by clipping (as
`SearchSpace.decode` does; with nevergrad's default "bouncing", its PSO stalls when x0 sits on a
bound, as Evo-Merging's α = 1 does), seeded through its ``random_state``. Asked candidates are kept
by value so `tell` hands nevergrad its own candidate back; a never-asked point (journal replay)
becomes `parametrization.spawn_child(new_value=z)`, which nevergrad accepts as a "tell not asked".
Some nevergrad optimizers (its CMA wraps pycma) draw from numpy's global generator; every call runs
with a private copy of that state swapped in, so a run is reproducible from its seed and a pickle
resumes exactly, whatever else uses numpy (single-threaded: the swap is not thread-safe, and an
optimizer is driven by one thread).
Any nevergrad registry name works as ``ng:<Name>``; the short names below are registered.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from evomerge._imports import require
from evomerge.errors import ConfigError
from evomerge.optimizers._base import Optimizer, register_optimizer

ALGORITHMS = {"ngopt": "NGOpt", "ng-cma": "CMA", "twopointsde": "TwoPointsDE", "pso": "PSO",
              "oneplusone": "OnePlusOne"}
DEFAULT_BUDGET = 1000


def _guard_metamodel(ng: Any) -> None:
    """Let nevergrad's surrogate step fail softly under numpy >= 2.4 (nevergrad issue #1612).

    nevergrad 1.0.12's `learn_on_k_best` calls float() on a one-element array, which numpy now
    refuses with a TypeError; NGOpt picks a MetaModel at ~20 dimensions and then crashes on its
    first surrogate step. Re-raised as nevergrad's own MetaModelFailure, the optimizer falls back
    to its base algorithm, as it does whenever the surrogate cannot be learned."""
    lib = ng.optimization.optimizerlib
    original = lib.learn_on_k_best
    if getattr(original, "evomerge_guard", False):
        return

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except TypeError as exc:
            raise lib.MetaModelFailure(f"surrogate step failed: {exc}") from exc

    guarded.evomerge_guard = True  # type: ignore[attr-defined]
    lib.learn_on_k_best = guarded


class NevergradOptimizer(Optimizer):
    """One nevergrad optimizer over the box. `budget` is the number of evaluations it will get, a
    hint some algorithms plan with (NGOpt picks its algorithm by it and cannot run without one);
    pass the stage's budget, else DEFAULT_BUDGET stands in. `num_workers` is how many candidates
    the scheduler keeps in flight (default: the population size); asking beyond it still works."""

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray, sigma0: float, seed: int,
                 popsize: int | None = None, budget: int | None = None, *, algorithm: str,
                 num_workers: int | None = None) -> None:
        super().__init__(lower, upper, x0, sigma0, seed, popsize, budget)
        ng = require("nevergrad", "nevergrad optimizers")
        _guard_metamodel(ng)
        if algorithm not in ng.optimizers.registry:
            raise ConfigError(f"nevergrad has no optimizer {algorithm!r}; see nevergrad.optimizers.registry")
        self.name = f"ng:{algorithm}"
        self.algorithm = algorithm
        param = ng.p.Array(init=self.x0).set_mutation(sigma=self.sigma0)
        param.set_bounds(self.lower, self.upper, method="clipping")
        param.random_state = np.random.RandomState(self.seed)
        self._global_state = np.random.RandomState(self.seed + 1).get_state()
        self.num_workers = int(num_workers or self.popsize)
        with self._private_global_rng():
            self.ng = ng.optimizers.registry[algorithm](parametrization=param, budget=int(budget or DEFAULT_BUDGET),
                                                        num_workers=self.num_workers)
        self._asked: dict[bytes, list[Any]] = {}

    @contextmanager
    def _private_global_rng(self) -> Iterator[None]:
        outside = np.random.get_state()
        np.random.set_state(self._global_state)
        try:
            with warnings.catch_warnings():
                # nevergrad's CMA tells a never-asked point to pycma unrepaired; pycma then warns
                # on every generation that holds one. The point is still used, as intended.
                warnings.filterwarnings("ignore", message="elements of z2", category=UserWarning)
                yield
        finally:
            self._global_state = np.random.get_state()
            np.random.set_state(outside)

    def _ask(self) -> np.ndarray:
        with self._private_global_rng():
            cand = self.ng.ask()
        z = np.clip(np.asarray(cand.value, dtype=float), self.lower, self.upper)
        self._asked.setdefault(z.tobytes(), []).append(cand)
        return z

    def _tell(self, z: np.ndarray, loss: float) -> None:
        waiting = self._asked.get(z.tobytes())
        with self._private_global_rng():
            if waiting:
                cand = waiting.pop(0)
                if not waiting:
                    del self._asked[z.tobytes()]
            else:
                cand = self.ng.parametrization.spawn_child(new_value=np.clip(z, self.lower, self.upper))
            self.ng.tell(cand, loss)


def nevergrad_factory(algorithm: str) -> Callable[..., NevergradOptimizer]:
    """A factory for `algorithm` with evomerge's optimizer signature."""

    def build(*args: Any, **options: Any) -> NevergradOptimizer:
        return NevergradOptimizer(*args, algorithm=algorithm, **options)

    build.__doc__ = f"nevergrad's {algorithm}."
    return build


for _key, _algorithm in ALGORITHMS.items():
    register_optimizer(_key)(nevergrad_factory(_algorithm))
