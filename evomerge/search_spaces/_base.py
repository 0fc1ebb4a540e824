"""The search-space contract: a flat vector z ↔ a `MergeRecipe`, with bounds and a start.

Bounds and transforms live here, never in an optimizer (nevergrad keeps parametrization apart
from optimizers for the same reason): an optimizer sees only a box in R^dim.
A `Plan` is a sequence of stages whose spaces may depend on the previous stage's best recipe
(Evo-Merging searches α first, then β with α fixed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from evomerge.errors import ConfigError, SearchSpaceError
from evomerge.recipe import MergeRecipe
from evomerge.registry import Registry


class SearchSpace(ABC):
    """Invariants: `lower < upper` elementwise, `lower <= x0 <= upper`, `decode(encode(r)) == r`
    for every recipe the space can produce, and `decode` accepts any finite z of size `dim`
    (points outside the box are clipped into it: optimizers may overshoot by rounding)."""

    name: str  # a class default; a labelled instance (coefficients.py) names itself
    lower: np.ndarray
    upper: np.ndarray
    x0: np.ndarray
    sigma0: float = 0.05
    """Initial step size suggested to optimizers, in the units of z."""
    optimizer: tuple[str, dict[str, Any]] | None = None
    """(name, options) of the optimizer a stage over this space always uses, whatever the
    search's (a fixed sweep); None: the search's optimizer."""

    @property
    def dim(self) -> int:
        return int(self.lower.size)

    def check(self, z: Any) -> np.ndarray:
        """z as a float vector of size `dim`, clipped into the bounds."""
        arr = np.asarray(z, dtype=float).reshape(-1)
        if arr.size != self.dim:
            raise SearchSpaceError(f"{self.name} space has dimension {self.dim}, got a vector of size {arr.size}")
        if not np.all(np.isfinite(arr)):
            raise SearchSpaceError(f"{self.name} space got a non-finite vector; every coordinate must be finite")
        return np.clip(arr, self.lower, self.upper)

    def decode(self, z: Any) -> MergeRecipe:
        return self._decode(self.check(z))

    @abstractmethod
    def _decode(self, z: np.ndarray) -> MergeRecipe:
        """Build the recipe of an in-bounds z."""

    @abstractmethod
    def encode(self, recipe: MergeRecipe) -> np.ndarray:
        """The z whose decoding is `recipe`; raises SearchSpaceError if the space cannot express it."""

    def penalty(self, z: np.ndarray) -> float:
        """A regulariser added to the loss the optimizer sees (e.g. λ·mean|z|); 0 by default."""
        return 0.0

    def describe(self) -> dict[str, Any]:
        """A JSON description, part of the journal's fingerprint of a run."""
        return {"space": self.name, "dim": self.dim}


class Plan(ABC):
    """A sequence of stages. Stage i searches `space(i, best recipe of stage i-1, budgets(total)[i])`
    with `budgets(total)[i]` evaluations; the budgets sum to the total exactly."""

    names: tuple[str, ...]

    @abstractmethod
    def budgets(self, total: int) -> list[int]:
        """Split `total` evaluations among the stages."""

    @abstractmethod
    def space(self, index: int, previous: MergeRecipe | None, budget: int | None = None) -> SearchSpace:
        """The space of stage `index`, built from the previous stage's best recipe; `budget`, the
        stage's evaluations, may size it (None: not known yet)."""

    def describe(self) -> dict[str, Any]:
        return {"plan": type(self).__name__, "stages": list(self.names)}


class SingleStage(Plan):
    """One space, searched with the whole budget."""

    names = ("search",)

    def __init__(self, space: SearchSpace) -> None:
        self._space = space

    def budgets(self, total: int) -> list[int]:
        return [total]

    def space(self, index: int, previous: MergeRecipe | None, budget: int | None = None) -> SearchSpace:
        return self._space

    def describe(self) -> dict[str, Any]:
        return {"plan": "single", "stages": [self._space.describe()]}


class Portfolio(Plan):
    """The same search over each of several families of experts (the RegMean-aligned copies, the
    experts as they are), half the budget each, one after the other; the run's final choice on
    validation picks among both families' finalists. Why: alignment lifted smol-mini's in-domain
    test exact match from 0.41 to 0.56 and took the tiny zoo's from 0.17 to 0.00, and which family
    wins shows only in a search, not in its first stages. A budget too small for two searches goes
    to the first family alone."""

    def __init__(self, plans: Sequence[SearchSpace | Plan]) -> None:
        if len(plans) < 2:
            raise ConfigError("a portfolio needs two plans or more")
        self.plans = tuple(as_plan(p) for p in plans)
        self.names = tuple(name for p in self.plans for name in p.names)
        self._offsets = [sum(len(p.names) for p in self.plans[:i]) for i in range(len(self.plans))]

    def budgets(self, total: int) -> list[int]:
        k = len(self.plans)
        shares = [total // k + (i < total % k) for i in range(k)]
        try:
            return [b for p, share in zip(self.plans, shares, strict=True) for b in p.budgets(share)]
        except ConfigError:
            return self.plans[0].budgets(total) + [0] * sum(len(p.names) for p in self.plans[1:])

    def space(self, index: int, previous: MergeRecipe | None, budget: int | None = None) -> SearchSpace:
        if not 0 <= index < len(self.names):
            raise ConfigError(f"the portfolio has {len(self.names)} stage(s); stage {index} does not exist")
        which = max(i for i, start in enumerate(self._offsets) if start <= index)
        local = index - self._offsets[which]
        return self.plans[which].space(local, previous if local else None, budget)  # a family starts afresh

    def describe(self) -> dict[str, Any]:
        return {"plan": "portfolio", "plans": [p.describe() for p in self.plans]}


def as_plan(space: SearchSpace | Plan) -> Plan:
    return space if isinstance(space, Plan) else SingleStage(space)


SPACES: Registry[Callable[..., Any]] = Registry("search space")
"""Space and plan builders by name (what users type in YAML): experts first, options as keywords."""
register_space = SPACES.register
