"""Search spaces: a flat vector z ↔ a `MergeRecipe`, and plans of several stages.

Every registered builder takes the expert names first and keyword options after (what a YAML
``space:`` block holds): ``build_space("evo", experts, schedule="two_stage")``.
"""

from __future__ import annotations

from typing import Any, Sequence

from evomerge.errors import ConfigError
from evomerge.search_spaces._base import SPACES, Plan, SearchSpace, SingleStage, as_plan, register_space
from evomerge.search_spaces.blockwise import BlockwiseSpace
from evomerge.search_spaces.classic import ClassicSpace, baseline, grid, grid_task_arithmetic
from evomerge.search_spaces.coefficients import CoefficientSpace, Field
from evomerge.search_spaces.evo import EvoPlan, EvoSpace, ScaleSpace
from evomerge.search_spaces.projected import ProjectedSpace


def build_space(name: str, experts: Sequence[str], **options: Any) -> SearchSpace | Plan:
    """The registered space or plan `name` over `experts`; ConfigError names the valid choices."""
    builder = SPACES[name]
    try:
        return builder(experts, **options)
    except TypeError as exc:
        raise ConfigError(f"search space {name!r} got invalid options {sorted(options)}: {exc}") from None


__all__ = ["SPACES", "Plan", "SearchSpace", "SingleStage", "as_plan", "register_space", "build_space",
           "CoefficientSpace", "Field", "EvoSpace", "ScaleSpace", "EvoPlan", "ClassicSpace", "BlockwiseSpace",
           "ProjectedSpace", "baseline", "grid", "grid_task_arithmetic"]
