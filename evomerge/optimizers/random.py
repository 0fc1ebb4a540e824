"""Uniform random search in the box (the baseline every optimizer must beat per evaluation), and a
fixed sweep of given points (a stage that tries a handful of values, such as a global scale)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evomerge.errors import ConfigError
from evomerge.optimizers._base import Optimizer, register_optimizer


@register_optimizer("random")
class RandomSearch(Optimizer):
    """Independent uniform samples from a seeded generator; tells only update the best."""

    name = "random"

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray, sigma0: float, seed: int,
                 popsize: int | None = None, budget: int | None = None) -> None:
        super().__init__(lower, upper, x0, sigma0, seed, popsize, budget)
        self.rng = np.random.default_rng(self.seed)

    def _ask(self) -> np.ndarray:
        return self.rng.uniform(self.lower, self.upper)

    def _tell(self, z: np.ndarray, loss: float) -> None:
        """Random search learns nothing from a result."""


@register_optimizer("grid")
class GridSweep(Optimizer):
    """Asks `points` in order, then again from the first: repeats are served from the search's
    cache without paying, so a stage given a budget of len(points) sweeps each once."""

    name = "grid"

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray, sigma0: float, seed: int,
                 popsize: int | None = None, budget: int | None = None,
                 points: Sequence[Sequence[float]] = ()) -> None:
        super().__init__(lower, upper, x0, sigma0, seed, popsize, budget)
        self.points = [np.asarray(p, dtype=float).reshape(-1) for p in points] or [self.x0.copy()]
        if any(p.shape != self.x0.shape for p in self.points):
            raise ConfigError(f"grid points must have the space's dimension {self.dim}")
        self.next = 0

    def _ask(self) -> np.ndarray:
        z = self.points[self.next % len(self.points)]
        self.next += 1
        return z.copy()

    def _tell(self, z: np.ndarray, loss: float) -> None:
        """A sweep's order is fixed in advance."""
