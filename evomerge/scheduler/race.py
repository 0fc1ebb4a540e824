"""Racing: score a candidate on a minibatch of the fit examples first, finish only the promising.

Most candidates of an evolutionary search are clearly worse than the population; scoring them on
every example buys nothing. A raced candidate is scored on the first `fraction` of the fit
examples, and finished on all of them only if its minibatch objective is within the `quantile`
of the *minibatch* objectives of the last `window` raced candidates (by default one population):
the same examples, so the same level. (A bar made of full-fit objectives is biased by how easy
the minibatch happens to be: measured, it stopped 2 of 30 candidates.) The first `warmup`
candidates are raced with no bar, to learn that level. A stopped candidate is recorded as
*stopped* and told to the optimizer as its minibatch objective plus the median (full − minibatch)
gap of recently finished candidates, so stopped and finished candidates are ranked on one scale.
Bars and gaps come from tells in ask order, so a raced run stays deterministic and resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from evomerge.errors import ConfigError


MINIBATCH_METRIC = "race/minibatch_loss"
"""The metric under which a finished raced candidate keeps its minibatch loss (journaled, so a
resumed run rebuilds the bar and the gaps)."""


@dataclass(frozen=True)
class Race:
    fraction: float = 0.25
    quantile: float = 0.5
    window: int | None = None
    warmup: int = 10
    """Full evaluations told before racing starts (the threshold needs a population to compare with)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"race fraction must lie strictly between 0 and 1, got {self.fraction}")
        if not 0.0 < self.quantile <= 1.0:
            raise ConfigError(f"race quantile must lie in (0, 1], got {self.quantile}")
        if (self.window is not None and self.window < 1) or self.warmup < 1:
            raise ConfigError("race window and warmup must be at least 1")

    def split(self, n_fit: int) -> str:
        """The minibatch split name understood by `Splits.get` ("fit:K")."""
        return f"fit:{max(1, math.ceil(self.fraction * n_fit))}"

    def threshold(self, minibatch_objectives: list[float], popsize: int) -> float:
        """The bar a minibatch objective must clear (infinite until `warmup` raced results exist)."""
        if len(minibatch_objectives) < self.warmup:
            return math.inf
        return float(np.quantile(minibatch_objectives[-(self.window or popsize):], self.quantile))

    def offset(self, gaps: list[float], popsize: int) -> float:
        """What a stopped candidate's minibatch objective is told plus: the recent median gap."""
        return float(np.median(gaps[-(self.window or popsize):])) if gaps else 0.0
