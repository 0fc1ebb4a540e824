"""Every space: decode/encode round-trips exactly, decode clips, sizes are checked."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from evomerge.errors import SearchSpaceError
from evomerge.recipe import MergeRecipe
from evomerge.search_spaces import SPACES, EvoSpace, ProjectedSpace, build_space

EXPERTS = ("math", "code", "law")

BUILDERS = {
    "evo_alpha": lambda: EvoSpace(EXPERTS, "alpha"),
    "evo_beta": lambda: EvoSpace(EXPERTS, "beta", alpha=[0.2, 0.5, 0.9]),
    "evo_joint": lambda: EvoSpace(EXPERTS, "joint"),
    "evo_tv_joint": lambda: EvoSpace(EXPERTS, "joint", method="evo_tv", penalty=0.0),
    "evo_scale": lambda: build_space("evo_joint", EXPERTS).space(0, None),
    "linear": lambda: build_space("linear", EXPERTS),
    "task_arithmetic": lambda: build_space("task_arithmetic", EXPERTS),
    "ties": lambda: build_space("ties", EXPERTS),
    "dare": lambda: build_space("dare", EXPERTS),
    "task_arithmetic_fixed_scale": lambda: build_space("task_arithmetic", EXPERTS, search_scale=False),
    "blockwise_ties": lambda: build_space("blockwise", EXPERTS, num_layers=6, groups=2, method="ties"),
    "blockwise_evo": lambda: build_space("blockwise", EXPERTS, num_layers=4, groups=2, method="evo"),
    "projected": lambda: build_space("projected", EXPERTS, k=3, projection_seed=5),
    "evo_blocks": lambda: build_space("evo_joint", EXPERTS, refine_groups=2, num_layers=4).space(
        4, MergeRecipe("evo_tv", EXPERTS, (0.9, -0.3, 0.05), (1.0, 0.6, 0.8))),
    "evo_blocks_carried": lambda: build_space("evo_joint", EXPERTS, refine_groups=2, num_layers=4,
                                              block_experts=True).space(
        4, MergeRecipe("evo_tv", EXPERTS, (0.9, -0.3, 0.05), (1.0, 0.6, 0.8)), 50),
}
SPACE_CACHE = {name: build() for name, build in BUILDERS.items()}


def vectors(space, spread: float = 3.0):
    """Finite vectors of the space's size, often outside its box."""
    lo, hi = space.lower - spread, space.upper + spread
    return st.tuples(*[st.floats(float(a), float(b), allow_nan=False) for a, b in zip(lo, hi)]).map(np.array)


def test_every_registered_name_is_covered():
    covered = {"evo", "evo_joint", "linear", "task_arithmetic", "ties", "dare", "blockwise", "projected"}
    assert set(SPACES) == covered


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_start_lies_in_bounds_and_decodes(name):
    space = SPACE_CACHE[name]
    assert np.all(space.lower < space.upper)
    assert np.all((space.lower <= space.x0) & (space.x0 <= space.upper))
    recipe = space.decode(space.x0)
    assert recipe.experts == EXPERTS
    assert MergeRecipe.from_dict(recipe.to_dict()) == recipe
    assert space.describe()["dim"] == space.dim


@pytest.mark.parametrize("name", sorted(BUILDERS))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_decode_clips_and_round_trips(name, data):
    space = SPACE_CACHE[name]
    z = data.draw(vectors(space))
    clipped = np.clip(z, space.lower, space.upper)
    recipe = space.decode(z)
    assert recipe == space.decode(clipped)
    if isinstance(space, ProjectedSpace):
        full = space.full(clipped)
        free = (full > space.inner.lower) & (full < space.inner.upper)
        assume(free.sum() >= space.dim)
        back = space.encode(recipe)
        np.testing.assert_allclose(back, clipped, atol=1e-9)
    else:
        back = space.encode(recipe)
        # to rounding: where z multiplies a |β| < 1 (the block stage), neighbouring floats decode alike
        np.testing.assert_allclose(back, clipped, rtol=1e-15, atol=1e-300)
    assert np.all((space.lower <= back) & (back <= space.upper))
    assert space.decode(back) == recipe


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_wrong_size_and_non_finite_raise(name):
    space = SPACE_CACHE[name]
    with pytest.raises(SearchSpaceError, match="dimension"):
        space.decode(np.zeros(space.dim + 1))
    bad = space.x0.copy()
    bad[0] = np.nan
    with pytest.raises(SearchSpaceError, match="non-finite"):
        space.decode(bad)


@pytest.mark.parametrize("name", sorted(BUILDERS))
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_penalty_is_lambda_mean_abs(name, data):
    space = SPACE_CACHE[name]
    z = data.draw(vectors(space, spread=1.0))
    if isinstance(space, ProjectedSpace):
        assert space.penalty(z) == space.inner.penalty(space.full(space.check(z)))
    else:
        expected = getattr(space, "penalty_weight", 0.0) * np.mean(np.abs(np.clip(z, space.lower, space.upper)))
        assert space.penalty(z) == pytest.approx(expected, abs=1e-15)


def test_encode_rejects_recipes_outside_the_space():
    space = SPACE_CACHE["evo_beta"]
    recipe = space.decode(space.x0)
    with pytest.raises(SearchSpaceError, match="fixed"):
        space.encode(MergeRecipe("evo", EXPERTS, recipe.weights, (1.0, 1.0, 1.0)))
    with pytest.raises(SearchSpaceError, match="experts"):
        space.encode(MergeRecipe("evo", ("a", "b", "c"), recipe.weights, recipe.densities))
    with pytest.raises(SearchSpaceError, match="holds evo"):
        space.encode(MergeRecipe("evo_tv", EXPERTS, recipe.weights, recipe.densities))
    with pytest.raises(SearchSpaceError, match="bounds"):
        space.encode(MergeRecipe("evo", EXPERTS, (2.0, 0.0, 0.0), recipe.densities))
    blockwise = SPACE_CACHE["blockwise_ties"]
    decoded = blockwise.decode(blockwise.x0 * 0.5)
    shifted = MergeRecipe(decoded.method, EXPERTS, (0.1, 0.2, 0.3), decoded.densities, decoded.scale, decoded.blocks)
    with pytest.raises(SearchSpaceError, match="mean of its blocks"):
        blockwise.encode(shifted)


def test_projection_rejects_a_recipe_out_of_its_range():
    space = SPACE_CACHE["projected"]
    inner = space.inner
    target = inner.x0.copy()
    target[3:] = [0.7, -0.9, 0.05]  # 3 free β coordinates ...
    target[:3] = [0.4, 0.6, 0.8]  # ... and 3 free α: 6 equations for k = 3 unknowns
    with pytest.raises(SearchSpaceError, match="range"):
        space.encode(inner.decode(target))


def test_projection_is_fixed_by_its_seed():
    a = build_space("projected", EXPERTS, k=3, projection_seed=5)
    b = build_space("projected", EXPERTS, k=3, projection_seed=5)
    c = build_space("projected", EXPERTS, k=3, projection_seed=6)
    z = np.array([0.3, -0.2, 0.1])
    assert a.decode(z) == b.decode(z) != c.decode(z)
    assert a.decode(a.x0) == a.inner.decode(a.inner.x0)
