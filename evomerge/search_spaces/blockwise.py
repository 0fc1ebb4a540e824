"""Anisotropic merging: one coefficient per expert per block (layer group × module kind).

Layer-wise scaling of task vectors beats one global weight per expert (AdaMerging, Sakana's
per-layer TIES/DARE search) at the cost of dimension: blocks × experts per field. Blocks come from
`evomerge.blocks.blocks_for(num_layers, groups)`. The base method's weights (and densities, where
it has them) repeat per block and decode into `recipe.blocks`; the scale stays global. Tensors
outside every block (embeddings, final norm, head) take the recipe's global weights and densities,
which are the mean over blocks: the natural middle ground, and what a single global search would
have to pick anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evomerge.blocks import KINDS, blocks_for
from evomerge.errors import ConfigError
from evomerge.search_spaces._base import register_space
from evomerge.search_spaces.classic import CLASSIC, classic_fields, drop_seed
from evomerge.search_spaces.coefficients import CoefficientSpace
from evomerge.search_spaces.evo import EVO_METHODS, EvoSpace

BASES = (*CLASSIC, *EVO_METHODS)


class BlockwiseSpace(CoefficientSpace):
    """A base method's per-expert coefficients, searched once per block."""

    def __init__(self, experts: Sequence[str], num_layers: int, *, method: str = "task_arithmetic",
                 groups: int = 4, kinds: Sequence[str] = KINDS, search: str = "joint",
                 penalty: float | None = None, sigma0: float = 0.05, seed: int | None = None,
                 **starts: Any) -> None:
        if method not in BASES:
            raise ConfigError(f"blockwise wraps one of {', '.join(BASES)}, got {method!r}")
        if num_layers < 1 or groups < 1:
            raise ConfigError(f"blockwise needs num_layers >= 1 and groups >= 1, got {num_layers} and {groups}")
        blocks = blocks_for(num_layers, groups, tuple(kinds))
        if method in EVO_METHODS:
            base = EvoSpace(experts, search, method=method, **starts)
            fields, lam = list(base.fields), base.penalty_weight
        else:
            fields, lam = classic_fields(method, len(experts), **starts), 0.0
        super().__init__(method, experts, fields, penalty=lam if penalty is None else penalty, sigma0=sigma0,
                         blocks=blocks, seed=drop_seed(method, seed), label=f"blockwise_{method}")


@register_space("blockwise")
def blockwise(experts: Sequence[str], num_layers: int, **options: Any) -> BlockwiseSpace:
    """Per-block coefficients of `method` (default task_arithmetic) over `groups` layer groups."""
    return BlockwiseSpace(experts, num_layers, **options)
