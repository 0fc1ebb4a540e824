"""Classic baselines and grids, and block-wise spaces decoded into per-block overrides."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.blocks import blocks_for
from evomerge.errors import ConfigError
from evomerge.search_spaces import baseline, build_space, grid, grid_task_arithmetic

EXPERTS = ("a", "b", "c", "d")


def test_baselines_are_the_textbook_recipes():
    assert baseline("uniform", EXPERTS).weights == (0.25,) * 4
    ta = baseline("task_arithmetic", EXPERTS)
    assert (ta.weights, ta.scale) == ((1.0,) * 4, 0.25)
    ties = baseline("ties", EXPERTS, densities=0.2)
    assert (ties.densities, ties.scale) == ((0.2,) * 4, 1.0)
    dare = baseline("dare", EXPERTS)
    assert dare.seed is not None and dare.seed == baseline("dare", EXPERTS).seed
    assert baseline("linear", EXPERTS).weights == (0.25,) * 4


def test_grids_sweep_scale_and_density():
    recipes = grid_task_arithmetic(EXPERTS, [0.3, 0.5, 1.0])
    assert [r.scale for r in recipes] == [0.3, 0.5, 1.0]
    assert len({r.key() for r in recipes}) == 3
    ties = grid("ties", EXPERTS, [0.5, 1.0], densities=[0.2, 0.8])
    assert [(r.scale, r.densities[0]) for r in ties] == [(0.5, 0.2), (0.5, 0.8), (1.0, 0.2), (1.0, 0.8)]
    with pytest.raises(ConfigError, match="outside"):
        grid_task_arithmetic(EXPERTS, [3.0])
    with pytest.raises(ConfigError, match="no densities"):
        grid("task_arithmetic", EXPERTS, [1.0], densities=[0.5])


def test_fixed_scale_is_not_searched():
    space = build_space("task_arithmetic", EXPERTS, search_scale=False, scale=0.4)
    assert space.dim == 4
    assert space.decode(np.zeros(4)).scale == 0.4


@pytest.mark.parametrize("method,per_block", [("task_arithmetic", 4), ("ties", 8), ("evo", 8), ("evo_ties", 8),
                                              ("linear", 4)])
def test_blockwise_decodes_one_override_per_block(method, per_block):
    names = blocks_for(6, 3)
    space = build_space("blockwise", EXPERTS, num_layers=6, groups=3, method=method)
    scale = 1 if method in ("task_arithmetic", "ties") else 0
    assert space.dim == len(names) * per_block + scale
    z = np.random.default_rng(0).uniform(space.lower, space.upper)
    recipe = space.decode(z)
    assert tuple(b.name for b in recipe.blocks) == names
    weights = np.array([b.weights for b in recipe.blocks])
    np.testing.assert_allclose(recipe.weights, weights.mean(axis=0))
    assert weights[1].tolist() == list(recipe.coefficients(names[1])[0])
    assert (recipe.blocks[0].densities is not None) == (per_block == 8)
    assert len({b.weights for b in recipe.blocks}) == len(names)


def test_blockwise_rejects_an_unknown_base():
    with pytest.raises(ConfigError, match="blockwise wraps"):
        build_space("blockwise", EXPERTS, num_layers=4, method="uniform")
