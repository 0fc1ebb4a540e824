"""Search spaces: a flat vector z ↔ a `MergeRecipe`, and plans of several stages.

Every registered builder takes the expert names first and keyword options after (what a YAML
``space:`` block holds): ``build_space("evo", experts, schedule="two_stage")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.search_spaces._base import SPACES, Plan, Portfolio, SearchSpace, SingleStage, as_plan, register_space
from evomerge.search_spaces.blockwise import BlockwiseSpace
from evomerge.search_spaces.classic import ClassicSpace, baseline, grid, grid_task_arithmetic
from evomerge.search_spaces.coefficients import CoefficientSpace, Field
from evomerge.search_spaces.evo import EvoPlan, EvoSpace, ScaleSpace
from evomerge.search_spaces.projected import ProjectedSpace

if TYPE_CHECKING:
    from evomerge.config import SpaceConfig


def build_space(name: str, experts: Sequence[str], **options: Any) -> SearchSpace | Plan:
    """The registered space or plan `name` over `experts`; ConfigError names the valid choices."""
    builder = SPACES[name]
    try:
        return builder(experts, **options)
    except TypeError as exc:
        raise ConfigError(f"search space {name!r} got invalid options {sorted(options)}: {exc}") from None


def space_from_config(config: SpaceConfig, experts: Sequence[str], num_layers: int | None,
                      alternatives: Sequence[str] | None = None) -> SearchSpace | Plan:
    """The configured space over `experts`, given the backend's layer count where its blocks need
    one: `evo_joint`'s default block stage, `blockwise`, or any plan's `refine_groups`. With
    `alternatives` (the same experts under other names: the sources of aligned copies), a
    `Portfolio` of that space over each family."""
    if alternatives is not None:
        return Portfolio([space_from_config(config, family, num_layers) for family in (experts, alternatives)])
    options = dict(config.options)
    if config.name == "evo_joint" and "num_layers" not in options and num_layers is not None:
        options["num_layers"] = num_layers  # its default block stage
    if (config.name == "blockwise" or options.get("refine_groups")) and "num_layers" not in options:
        if num_layers is None:
            raise ConfigError(f"the {config.name} space's blocks need space.options.num_layers for this backend")
        options["num_layers"] = num_layers
    return build_space(config.name, experts, **options)


__all__ = ["SPACES", "Plan", "Portfolio", "SearchSpace", "SingleStage", "as_plan", "register_space", "build_space",
           "space_from_config",
           "CoefficientSpace", "Field", "EvoSpace", "ScaleSpace", "EvoPlan", "ClassicSpace", "BlockwiseSpace",
           "ProjectedSpace", "baseline", "grid", "grid_task_arithmetic"]
