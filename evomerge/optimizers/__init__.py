"""Optimizers: ask/tell minimisers over a search space's box, found by the name users type.

`make_optimizer("cma", space, seed=42)` builds one from a `SearchSpace`'s bounds, start and σ0.
Names: cma, random, ngopt, ng-cma, twopointsde, pso, oneplusone, and ng:<Name> for any other
nevergrad optimizer. cma and nevergrad are imported only when one is built.
"""

from __future__ import annotations

from typing import Any

from evomerge.errors import ConfigError
from evomerge.optimizers import cma as _cma  # noqa: F401  (registers "cma")
from evomerge.optimizers import random as _random  # noqa: F401  (registers "random")
from evomerge.optimizers._base import OPTIMIZERS, Optimizer, register_optimizer
from evomerge.optimizers.nevergrad import NevergradOptimizer, nevergrad_factory
from evomerge.search_spaces._base import SearchSpace

NG_PREFIX = "ng:"


def make_optimizer(name: str, space: SearchSpace, seed: int, popsize: int | None = None,
                   budget: int | None = None, **options: Any) -> Optimizer:
    """The optimizer `name` over `space`'s box, started at its x0 with its sigma0; `budget` (the
    evaluations it will get; a `budget` option overrides it) is for those that plan by it (nevergrad's)."""
    factory = nevergrad_factory(name[len(NG_PREFIX):]) if name.lower().startswith(NG_PREFIX) else OPTIMIZERS[name]
    options.setdefault("budget", budget)
    try:
        return factory(space.lower, space.upper, space.x0, space.sigma0, seed, popsize, **options)
    except TypeError as exc:
        raise ConfigError(f"optimizer {name!r} got invalid options {sorted(options)}: {exc}") from None


__all__ = ["OPTIMIZERS", "Optimizer", "register_optimizer", "make_optimizer", "NevergradOptimizer"]
