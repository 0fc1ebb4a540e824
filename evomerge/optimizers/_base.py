"""The optimizer contract: ask/tell minimisation over a box.

The base class keeps the bookkeeping (counts, best so far); a subclass implements `_ask` and
`_tell`. `ask` never blocks waiting for tells (an asynchronous scheduler may ask ahead of a
generation), and `tell` accepts points that were never asked, so a journal can be replayed.
There is no optimizer checkpoint: resume rebuilds the optimizer from its seed and replays the
journaled asks and tells in their order (scheduler/loop.py), so "same seed and same calls ⇒
same asks" is all an optimizer promises, and a journal holds data only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from evomerge.errors import ConfigError
from evomerge.registry import Registry


class Optimizer(ABC):
    """Minimises a loss over [lower, upper] ⊂ R^dim. Same seed and same tells ⇒ same asks."""

    name: str = ""

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray, sigma0: float,
                 seed: int, popsize: int | None = None, budget: int | None = None) -> None:
        self.lower = np.asarray(lower, dtype=float)
        self.upper = np.asarray(upper, dtype=float)
        self.x0 = np.asarray(x0, dtype=float)
        if not (self.lower.shape == self.upper.shape == self.x0.shape) or self.lower.ndim != 1:
            raise ConfigError("optimizer bounds and x0 must be 1-D vectors of the same size")
        if np.any(self.lower >= self.upper):
            raise ConfigError("optimizer bounds are empty: every lower bound must be below its upper bound")
        if np.any(self.x0 < self.lower) or np.any(self.x0 > self.upper):
            raise ConfigError("the initial point lies outside the bounds; move x0 inside or widen the bounds")
        if not sigma0 > 0:
            raise ConfigError(f"sigma0 must be positive, got {sigma0}")
        self.sigma0 = float(sigma0)
        self.seed = int(seed)
        self.popsize = int(popsize) if popsize else self.default_popsize(self.x0.size)
        self.budget = budget
        """The evaluations it will get (None: unknown); only optimizers that plan by it read it."""
        if self.popsize < 2:
            raise ConfigError(f"population size must be at least 2, got {self.popsize}")
        self.n_asked = 0
        self.n_told = 0
        self.best_z: np.ndarray | None = None
        self.best_loss = math.inf

    @property
    def dim(self) -> int:
        return int(self.x0.size)

    @staticmethod
    def default_popsize(dim: int) -> int:
        """CMA-ES's default λ = 4 + ⌊3 ln d⌋."""
        return 4 + int(3 * math.log(max(dim, 1)))

    def ask(self) -> np.ndarray:
        z = np.clip(np.asarray(self._ask(), dtype=float).reshape(-1), self.lower, self.upper)
        self.n_asked += 1
        return z

    def tell(self, z: np.ndarray, loss: float) -> None:
        """Report `loss` at `z`. Failed candidates are told a finite penalty by the caller."""
        z = np.asarray(z, dtype=float).reshape(-1)
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"tell() needs a finite loss, got {loss}; tell failures as a penalty")
        self._tell(z, loss)
        self.n_told += 1
        if loss < self.best_loss:
            self.best_loss, self.best_z = loss, z.copy()

    def recommend(self) -> np.ndarray:
        """The point the optimizer believes best (by default the best told)."""
        return self.x0.copy() if self.best_z is None else self.best_z.copy()

    @abstractmethod
    def _ask(self) -> np.ndarray: ...

    @abstractmethod
    def _tell(self, z: np.ndarray, loss: float) -> None: ...


OPTIMIZERS: Registry[Callable[..., Optimizer]] = Registry("optimizer", fold_case=True,
                                                          also="ng:<nevergrad name>")
"""Optimizer factories by name (case-insensitive, what users type)."""
register_optimizer = OPTIMIZERS.register
