"""Uniform random search in the box: the baseline every optimizer must beat per evaluation."""

from __future__ import annotations

import numpy as np

from evomerge.optimizers._base import Optimizer, register_optimizer


@register_optimizer("random")
class RandomSearch(Optimizer):
    """Independent uniform samples from a seeded generator; tells only update the best."""

    name = "random"

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray, sigma0: float, seed: int,
                 popsize: int | None = None) -> None:
        super().__init__(lower, upper, x0, sigma0, seed, popsize)
        self.rng = np.random.default_rng(self.seed)

    def _ask(self) -> np.ndarray:
        return self.rng.uniform(self.lower, self.upper)

    def _tell(self, z: np.ndarray, loss: float) -> None:
        """Random search learns nothing from a result."""
