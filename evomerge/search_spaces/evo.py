"""Evo-Merging's spaces and its two-stage plan (arXiv 2509.12951, see PAPER.md).

Per expert i: a keep ratio α_i ∈ [0, 1] (the recipe's densities) and a signed scale
β_i ∈ [-1.5, 1.5] (the recipe's weights). The paper searches α with β fixed at 1/N, then β with α
fixed at the stage-1 best, minimising the loss plus 0.05·mean|z|.

Registered names:
- ``evo``: the paper-faithful two-stage plan (α from 1 with β = 1/N, a third of the budget; then β
  from the stage-1 best, two thirds). ``schedule`` picks "alpha", "beta" or "joint" instead,
  ``beta_init="1"`` runs stage 1 with every β = 1.
- ``evo_joint`` (evomerge's default): one stage over z = [α; β] from α = 1, β = 1/N, merged in
  the task-vector form ``evo_tv`` unless ``method`` says otherwise. Why: with a large repository,
  stage 1 at β = 1/N barely moves the loss (every expert's update is scaled by 1/N, and the
  LoRA-factor merge is quadratic in β, so each expert's own term is scaled by 1/N²), so α is
  chosen almost blind; searching α and β together, linear in β, lets α matter as soon as an
  expert's β grows. The start is the uniform merge (a sane model for any N), where β = 1 for every
  expert would add N full updates at once.
"""

from __future__ import annotations

from typing import Any, Sequence

from evomerge.errors import ConfigError
from evomerge.recipe import MergeRecipe
from evomerge.search_spaces._base import Plan, SearchSpace, register_space
from evomerge.search_spaces.coefficients import CoefficientSpace, Field, per_expert

ALPHA_BOUNDS = (0.0, 1.0)
BETA_BOUNDS = (-1.5, 1.5)
SEARCHES = ("alpha", "beta", "joint")
SCHEDULES = ("two_stage", *SEARCHES)
EVO_METHODS = ("evo", "evo_tv")


def _beta_start(beta_init: str | float, n: int) -> float:
    if beta_init == "1/N":
        return 1.0 / n
    try:
        return float(beta_init)
    except (TypeError, ValueError):
        raise ConfigError(f"beta_init must be '1/N' or a number such as 1, got {beta_init!r}") from None


class EvoSpace(CoefficientSpace):
    """α (densities) and/or β (weights) of an evo or evo_tv recipe; unsearched ones stay fixed."""

    def __init__(self, experts: Sequence[str], search: str = "joint", *, method: str = "evo",
                 alpha: float | Sequence[float] | None = None, beta: float | Sequence[float] | None = None,
                 penalty: float = 0.05, sigma0: float = 0.05) -> None:
        if search not in SEARCHES:
            raise ConfigError(f"evo search must be one of {', '.join(SEARCHES)}, got {search!r}")
        if method not in EVO_METHODS:
            raise ConfigError(f"evo spaces merge with method evo or evo_tv, got {method!r}")
        n = len(experts)
        if n == 0:
            raise ConfigError("a search space needs at least one expert")
        fields = [
            Field("densities", *ALPHA_BOUNDS, per_expert(alpha, n, 1.0, "alpha"), search in ("alpha", "joint")),
            Field("weights", *BETA_BOUNDS, per_expert(beta, n, 1.0 / n, "beta"), search in ("beta", "joint")),
        ]
        super().__init__(method, experts, fields, penalty=penalty, sigma0=sigma0, label=f"evo_{search}")
        self.search = search


class EvoPlan(Plan):
    """The Evo-Merging schedule: two stages (α, then β with α fixed at the stage-1 best) or one."""

    def __init__(self, experts: Sequence[str], schedule: str = "two_stage", *, method: str = "evo",
                 beta_init: str | float = "1/N", alpha_init: float = 1.0, alpha_fraction: float = 1 / 3,
                 penalty: float = 0.05, sigma0: float = 0.05) -> None:
        if schedule not in SCHEDULES:
            raise ConfigError(f"evo schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if not 0 < alpha_fraction < 1:
            raise ConfigError(f"alpha_fraction must lie strictly between 0 and 1, got {alpha_fraction}")
        self.experts = tuple(experts)
        self.schedule = schedule
        self.names = ("alpha", "beta") if schedule == "two_stage" else (schedule,)
        self.alpha_fraction = alpha_fraction
        self.beta0 = _beta_start(beta_init, len(self.experts))
        self._common: dict[str, Any] = {"method": method, "penalty": penalty, "sigma0": sigma0}
        self.alpha0 = alpha_init
        self.beta_init = beta_init
        # Validate the options now, not at stage 2.
        EvoSpace(self.experts, self.names[0], alpha=alpha_init, beta=self.beta0, **self._common)

    def budgets(self, total: int) -> list[int]:
        """Two stages: round(total·alpha_fraction) for α (at least 1), the rest for β."""
        if total < len(self.names):
            raise ConfigError(f"the {self.schedule} evo plan needs a budget of at least {len(self.names)}, got {total}")
        if len(self.names) == 1:
            return [total]
        first = min(total - 1, max(1, round(total * self.alpha_fraction)))
        return [first, total - first]

    def space(self, index: int, previous: MergeRecipe | None) -> SearchSpace:
        if not 0 <= index < len(self.names):
            raise ConfigError(f"the evo plan has {len(self.names)} stage(s); stage {index} does not exist")
        if index == 0:
            return EvoSpace(self.experts, self.names[0], alpha=self.alpha0, beta=self.beta0, **self._common)
        if previous is None or previous.densities is None or previous.experts != self.experts:
            raise ConfigError("stage 'beta' needs stage 'alpha''s best recipe (with densities, same experts)")
        lo, hi = BETA_BOUNDS
        beta = [min(hi, max(lo, b)) for b in previous.weights]
        return EvoSpace(self.experts, "beta", alpha=previous.densities, beta=beta, **self._common)

    def describe(self) -> dict[str, Any]:
        return {"plan": "evo", "schedule": self.schedule, "stages": list(self.names),
                "beta_init": str(self.beta_init), "alpha_init": self.alpha0,
                "alpha_fraction": self.alpha_fraction, **self._common}


@register_space("evo")
def evo(experts: Sequence[str], schedule: str = "two_stage", **options: Any) -> EvoPlan:
    """The paper-faithful Evo-Merging plan (two stages unless `schedule` says otherwise)."""
    return EvoPlan(experts, schedule, **options)


@register_space("evo_joint")
def evo_joint(experts: Sequence[str], **options: Any) -> EvoPlan:
    """α and β searched together from α = 1, β = 1/N, task-vector form by default (see the module
    docstring for why)."""
    return EvoPlan(experts, "joint", **{"method": "evo_tv", **options})
