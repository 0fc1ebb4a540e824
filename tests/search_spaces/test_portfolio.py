"""`Portfolio`: one search per family of experts (aligned copies, the experts as they are), the
budget shared exactly, each family started afresh, the final choice among both."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import evomerge
from evomerge.errors import ConfigError
from evomerge.recipe import MergeRecipe
from evomerge.search_spaces import Portfolio, build_space

ALIGNED, AS_THEY_ARE = ("a@regmean", "b@regmean", "c@regmean"), ("a", "b", "c")


def portfolio() -> Portfolio:
    return Portfolio([build_space("evo_joint", list(ALIGNED)), build_space("evo_joint", list(AS_THEY_ARE))])


@given(st.integers(min_value=8, max_value=600))
def test_each_family_gets_its_plan_over_half_the_budget(total: int) -> None:
    plans = portfolio()
    budgets = plans.budgets(total)
    first, second = plans.plans
    assert sum(budgets) == total and len(budgets) == len(plans.names)
    assert budgets == first.budgets(total - total // 2) + second.budgets(total // 2)


def test_a_budget_too_small_for_two_searches_goes_to_the_first_family() -> None:
    plans = portfolio()
    first, second = plans.plans
    assert plans.budgets(5) == first.budgets(5) + [0] * len(second.names)
    with pytest.raises(ConfigError):
        plans.budgets(1)  # too small even for one


def test_the_second_family_starts_afresh_not_from_the_first_familys_best() -> None:
    plans = portfolio()
    first, second = plans.plans
    offset = len(first.names)
    best_of_first = MergeRecipe("evo_tv", ALIGNED, (0.9, 0.1, 0.2), (1.0, 1.0, 1.0))
    assert plans.space(offset, best_of_first).describe() == second.space(0, None).describe()
    swept = MergeRecipe("evo_tv", AS_THEY_ARE, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0))
    assert plans.space(offset + 1, swept).describe() == second.space(1, swept).describe()  # within it, as always
    assert plans.space(1, best_of_first).describe() == first.space(1, best_of_first).describe()
    with pytest.raises(ConfigError, match="does not exist"):
        plans.space(len(plans.names), None)


def test_a_search_over_a_portfolio_returns_the_family_that_fits_best() -> None:
    def fitness(recipe: MergeRecipe) -> float:  # only the experts as they are can reach below 1
        target = 0.7 if recipe.experts == AS_THEY_ARE else 5.0
        return sum((w - target) ** 2 for w in recipe.weights) + (0.0 if recipe.experts == AS_THEY_ARE else 1.0)

    result = evomerge.search(fitness, portfolio(), budget=60, seed=0)
    assert result.best_recipe.experts == AS_THEY_ARE and result.best_loss < 0.5
    families = {t.recipe.experts for t in result.trials if not t.cached}
    assert families == {ALIGNED, AS_THEY_ARE}
    assert sum(s.budget for s in result.stages) == 60 and len(result.stages) == len(portfolio().names)
