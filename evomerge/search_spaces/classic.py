"""Classic merge methods as search spaces, and as the fixed baselines a search must beat.

Each space's start `x0` decodes to the method's textbook recipe (`baseline`), and the grid
helpers return the recipes a practitioner would sweep by hand.

Bounds and starts (the recipe's fields, see `evomerge.recipe`):
- ``linear``: weights ∈ [0, 1] from 1/N (normalised by their sum, so only ratios matter).
- ``task_arithmetic``: weights ∈ [-1.5, 1.5] from 1, scale ∈ [0, 2] from 1/N (the start is the
  uniform average; scale moves every expert at once, weights move one).
- ``ties``: weights from 1, densities ∈ [0, 1] from 0.5, scale ∈ [0, 2] from 1 (the disjoint mean
  already averages).
- ``dare``: weights from 1, densities ∈ [0.01, 1] from 0.5 (the rescale divides by the density),
  scale from 1/N, and a fixed drop seed.
`search_scale=False` fixes the scale at its start.
"""

from __future__ import annotations

from typing import Any, Sequence

from evomerge.errors import ConfigError
from evomerge.recipe import MergeRecipe, uniform
from evomerge.search_spaces._base import register_space
from evomerge.search_spaces.coefficients import CoefficientSpace, Field, per_expert

CLASSIC = ("linear", "task_arithmetic", "ties", "dare")
DARE_SEED = 0


def classic_fields(method: str, n: int, *, weights: float | Sequence[float] | None = None,
                   densities: float | Sequence[float] | None = None, scale: float | None = None,
                   search_scale: bool = True) -> list[Field]:
    """The fields of a classic method for n experts, started at the given values or the defaults."""
    if method == "linear":
        return [Field("weights", 0.0, 1.0, per_expert(weights, n, 1.0 / n, "weights"))]
    if method not in CLASSIC:
        raise ConfigError(f"unknown classic merge method {method!r}; choose one of {', '.join(CLASSIC)}")
    fields = [Field("weights", -1.5, 1.5, per_expert(weights, n, 1.0, "weights"))]
    if method in ("ties", "dare"):
        lo = 0.01 if method == "dare" else 0.0
        fields.append(Field("densities", lo, 1.0, per_expert(densities, n, 0.5, "densities")))
    start = scale if scale is not None else (1.0 if method == "ties" else 1.0 / n)
    fields.append(Field("scale", 0.0, 2.0, (float(start),), search_scale))
    return fields


class ClassicSpace(CoefficientSpace):
    """The coefficients of linear, task arithmetic, TIES or DARE over a set of experts."""

    def __init__(self, method: str, experts: Sequence[str], *, penalty: float = 0.0, sigma0: float = 0.05,
                 seed: int | None = None, **starts: Any) -> None:
        fields = classic_fields(method, len(experts), **starts)
        if method == "dare" and seed is None:
            seed = DARE_SEED
        super().__init__(method, experts, fields, penalty=penalty, sigma0=sigma0,
                         seed=seed if method == "dare" else None, label=method)


def _register(method: str) -> None:
    def build(experts: Sequence[str], **options: Any) -> ClassicSpace:
        return ClassicSpace(method, experts, **options)

    build.__doc__ = f"The {method} merge as a search space."
    register_space(method)(build)


for _method in CLASSIC:
    _register(_method)


def baseline(method: str, experts: Sequence[str], **starts: Any) -> MergeRecipe:
    """The textbook recipe of `method` (the start of its space); ``uniform`` needs no options."""
    if method == "uniform":
        return uniform(experts)
    space = ClassicSpace(method, experts, **starts)
    return space.decode(space.x0)


def grid(method: str, experts: Sequence[str], lambdas: Sequence[float],
         densities: Sequence[float] | None = None) -> list[MergeRecipe]:
    """The hand-tuned sweep of a classic method: one recipe per scale λ (× shared density for
    ties and dare), every expert at weight 1 (linear: equal weights, so λ is ignored)."""
    if method in ("ties", "dare"):
        return [baseline(method, experts, scale=lam, densities=d) for lam in lambdas for d in (densities or (0.5,))]
    if densities is not None:
        raise ConfigError(f"{method} has no densities; drop them from its grid")
    return [baseline(method, experts, scale=lam) for lam in lambdas] if method != "linear" else [baseline(method, experts)]


def grid_task_arithmetic(experts: Sequence[str], lambdas: Sequence[float]) -> list[MergeRecipe]:
    """θ_0 + λ·Σ τ_i for each λ: the usual task arithmetic sweep."""
    return grid("task_arithmetic", experts, lambdas)
