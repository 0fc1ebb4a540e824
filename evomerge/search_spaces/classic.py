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

from collections.abc import Container, Sequence
from typing import Any

from evomerge.errors import ConfigError
from evomerge.recipe import METHODS, MergeMethod, MergeRecipe, methods_in, uniform
from evomerge.search_spaces._base import register_space
from evomerge.search_spaces.coefficients import CoefficientSpace, Field, per_expert

CLASSIC = methods_in("classic")
DARE_SEED = 0
"""The drop seed of a stochastic method's space (DARE) when none is given."""


def _descriptor(method: str, among: Container[str] = METHODS) -> MergeMethod:
    """`method`'s descriptor; ConfigError naming the classic methods where it is not `among` them."""
    if method not in among:
        raise ConfigError(f"unknown classic merge method {method!r}; choose one of {', '.join(CLASSIC)}")
    return METHODS[method]


def classic_fields(method: str, n: int, *, weights: float | Sequence[float] | None = None,
                   densities: float | Sequence[float] | None = None, scale: float | None = None,
                   search_scale: bool = True) -> list[Field]:
    """The fields of a classic method for n experts, started at the given values or the defaults."""
    m = _descriptor(method, CLASSIC)
    if m.weighting == "normalised":
        return [Field("weights", 0.0, 1.0, per_expert(weights, n, 1.0 / n, "weights"))]
    fields = [Field("weights", -1.5, 1.5, per_expert(weights, n, 1.0, "weights"))]
    if m.densities:
        lo = 0.01 if m.stochastic else 0.0
        fields.append(Field("densities", lo, 1.0, per_expert(densities, n, 0.5, "densities")))
    start = scale if scale is not None else (1.0 if m.disjoint_mean else 1.0 / n)
    fields.append(Field("scale", 0.0, 2.0, (float(start),), search_scale))
    return fields


class ClassicSpace(CoefficientSpace):
    """The coefficients of linear, task arithmetic, TIES or DARE over a set of experts."""

    def __init__(self, method: str, experts: Sequence[str], *, penalty: float = 0.0, sigma0: float = 0.05,
                 seed: int | None = None, **starts: Any) -> None:
        fields = classic_fields(method, len(experts), **starts)
        super().__init__(method, experts, fields, penalty=penalty, sigma0=sigma0, seed=drop_seed(method, seed),
                         label=method)


def drop_seed(method: str, seed: int | None) -> int | None:
    """The recipe seed of `method`'s space: `seed` (else `DARE_SEED`) for a stochastic method, else None."""
    if not METHODS[method].stochastic:
        return None
    return DARE_SEED if seed is None else seed


def _register(method: str) -> None:
    def build(experts: Sequence[str], **options: Any) -> ClassicSpace:
        return ClassicSpace(method, experts, **options)

    build.__doc__ = f"The {method} merge as a search space."
    register_space(method)(build)


for _method in CLASSIC:
    _register(_method)


def baseline(method: str, experts: Sequence[str], **starts: Any) -> MergeRecipe:
    """The textbook recipe of `method` (the start of its space); ``uniform`` needs no options."""
    if _descriptor(method).weighting == "uniform":
        return uniform(experts)
    space = ClassicSpace(method, experts, **starts)
    return space.decode(space.x0)


def grid(method: str, experts: Sequence[str], lambdas: Sequence[float],
         densities: Sequence[float] | None = None) -> list[MergeRecipe]:
    """The hand-tuned sweep of a classic method: one recipe per scale λ (× shared density for
    ties and dare), every expert at weight 1 (linear: equal weights, so λ is ignored)."""
    m = _descriptor(method)
    if m.densities:
        return [baseline(method, experts, scale=lam, densities=d) for lam in lambdas for d in (densities or (0.5,))]
    if densities is not None:
        raise ConfigError(f"{method} has no densities; drop them from its grid")
    if m.weighting == "normalised":
        return [baseline(method, experts)]
    return [baseline(method, experts, scale=lam) for lam in lambdas]


def grid_task_arithmetic(experts: Sequence[str], lambdas: Sequence[float]) -> list[MergeRecipe]:
    """θ_0 + λ·Σ τ_i for each λ: the usual task arithmetic sweep."""
    return grid("task_arithmetic", experts, lambdas)
