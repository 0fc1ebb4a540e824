"""Racing: score a candidate on a minibatch of the fit examples first, finish only the promising.

Most candidates of an evolutionary search are clearly worse than the population; scoring them on
every example buys nothing. A raced candidate is scored on the first `fraction` of the fit
examples; it is finished on all of them only if its minibatch objective is within the
`quantile` of the full objectives told most recently (the last `window`, by default one
population of the optimizer; earlier stages' count too), else it is recorded as *stopped* and the
optimizer is told its minibatch objective. A finished candidate pays only for the examples its
minibatch did not score (`evomerge.backends.memo`). The threshold is fixed when the candidate is
asked, from tells that are themselves in ask order, so a raced run stays deterministic and
resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from evomerge.errors import ConfigError


@dataclass(frozen=True)
class Race:
    fraction: float = 0.25
    quantile: float = 0.25
    """The bar: this quantile of the recent full objectives (of finished candidates, themselves
    survivors). 0.25 needed 69–75 % of the queries of a full run to reach its best on tiny, 0.5
    needed 77–90 % and 0.1–0.15 77 % (benchmarks/QUALITY.md, "Query efficiency")."""
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

    def threshold(self, full_objectives: list[float], popsize: int) -> float | None:
        """The bar a minibatch objective must clear, or None while too few full results exist."""
        if len(full_objectives) < self.warmup:
            return None
        return float(np.quantile(full_objectives[-(self.window or popsize):], self.quantile))
