"""A low-dimensional view of a big space: full = clip(x0 + M·z), z ∈ [-1, 1]^k (Black-Box Tuning).

With hundreds of experts (or blocks × experts) CMA-ES in the full dimension learns too slowly; a
fixed random matrix M (d × k, seeded by `projection_seed`) lets the optimizer search k ≪ d numbers
while every candidate still sets every coefficient. Row i of M has entries N(0, 1/k) times half the
width of coordinate i, so z on the unit box's corners moves each coordinate by about its half-width:
the box [-1, 1]^k reaches all of the inner box without wasting most of z's range on clipping.
sigma0 for z is the inner sigma0 in units of those half-widths, so the first steps are as large as
the inner space's.

z is rounded to 9 decimals before it is projected (far below any useful step), so `encode` (least
squares on the coordinates that were not clipped, rounded the same way, then checked by decoding)
reproduces a decoded recipe exactly, as long as the unclipped coordinates determine z (at least k
of them, in general position). Any other recipe raises SearchSpaceError.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from evomerge.errors import ConfigError, SearchSpaceError
from evomerge.recipe import MergeRecipe
from evomerge.search_spaces._base import SPACES, Plan, SearchSpace, register_space

DECIMALS = 9


class ProjectedSpace(SearchSpace):
    """`inner`'s coefficients driven by k numbers through a fixed random matrix."""

    name = "projected"

    def __init__(self, inner: SearchSpace, k: int, projection_seed: int = 0) -> None:
        if not k >= 1:
            raise ConfigError(f"projected space needs a dimension k >= 1, got {k}")
        self.inner = inner
        self.projection_seed = int(projection_seed)
        half = (inner.upper - inner.lower) / 2.0
        gauss = np.random.default_rng(self.projection_seed).standard_normal((inner.dim, k))
        self.matrix = gauss * half[:, None] / np.sqrt(k)
        self.lower, self.upper, self.x0 = -np.ones(k), np.ones(k), np.zeros(k)
        self.sigma0 = float(min(0.5, inner.sigma0 / float(np.median(half))))

    def full(self, z: np.ndarray) -> np.ndarray:
        """The inner space's vector for an in-bounds z."""
        return np.clip(self.inner.x0 + self.matrix @ np.round(z, DECIMALS), self.inner.lower, self.inner.upper)

    def _decode(self, z: np.ndarray) -> MergeRecipe:
        return self.inner.decode(self.full(z))

    def encode(self, recipe: MergeRecipe) -> np.ndarray:
        target = self.inner.encode(recipe)
        free = (target > self.inner.lower) & (target < self.inner.upper)
        z: np.ndarray = np.linalg.lstsq(self.matrix[free], target[free] - self.inner.x0[free], rcond=None)[0]
        z = np.round(z, DECIMALS)
        if np.any(np.abs(z) > 1.0) or self.decode(z) != recipe:
            raise SearchSpaceError(f"the recipe is outside the range of the {self.dim}-dimensional projection "
                                   f"of the {self.inner.name} space; search the inner space to reach it")
        return z

    def penalty(self, z: np.ndarray) -> float:
        """The inner space's penalty on the coefficients z stands for."""
        return self.inner.penalty(self.full(self.check(z)))

    def describe(self) -> dict[str, Any]:
        return {"space": self.name, "dim": self.dim, "projection_seed": self.projection_seed,
                "inner": self.inner.describe()}


@register_space("projected")
def projected(experts: Sequence[str], inner: str = "evo_joint", k: int = 16, projection_seed: int = 0,
              inner_options: dict[str, Any] | None = None) -> ProjectedSpace:
    """Project the registered single-stage space `inner` (built with `inner_options`; evo_joint
    without its starts, stages of their own) down to k."""
    builder = SPACES[inner]
    options = dict(inner_options or {})
    if inner == "evo_joint":  # without its starts (stages of their own)
        options = {"scale_grid": None, "singles": False, **options}
    built = builder(experts, **options)
    if isinstance(built, Plan):
        if len(built.names) != 1:
            raise ConfigError(f"projected needs a single-stage inner space; {inner!r} has stages {list(built.names)}")
        built = built.space(0, None)
    return ProjectedSpace(built, k, projection_seed)
