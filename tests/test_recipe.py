import math

import pytest
from hypothesis import given, strategies as st

from evomerge.errors import RecipeError
from evomerge.recipe import BlockOverride, MergeRecipe, uniform

finite = st.floats(min_value=-10, max_value=10, allow_nan=False)


@given(st.integers(1, 6).flatmap(lambda n: st.tuples(
    st.lists(finite, min_size=n, max_size=n), st.lists(st.floats(0, 1), min_size=n, max_size=n), st.just(n))))
def test_dict_round_trip_and_key(args):
    weights, densities, n = args
    r = MergeRecipe("ties", tuple(f"e{i}" for i in range(n)), tuple(weights), tuple(densities), scale=0.7,
                    blocks=(BlockOverride("layers.0-1.attn", tuple(weights), None),), seed=3)
    back = MergeRecipe.from_dict(r.to_dict())
    assert back == r
    assert back.key() == r.key()


def test_key_changes_with_any_coefficient():
    a = MergeRecipe("evo", ("x", "y"), (0.5, 0.5), (1.0, 1.0))
    b = MergeRecipe("evo", ("x", "y"), (0.5, 0.5000001), (1.0, 1.0))
    assert a.key() != b.key()


@pytest.mark.parametrize("kwargs, words", [
    ({"method": "nope", "experts": ("a",), "weights": (1.0,)}, "unknown merge method"),
    ({"method": "evo", "experts": ("a", "b"), "weights": (1.0,)}, "one per expert"),
    ({"method": "evo", "experts": ("a",), "weights": (math.nan,)}, "finite"),
    ({"method": "evo", "experts": ("a",), "weights": (1.0,), "densities": (1.5,)}, "[0, 1]"),
    ({"method": "evo", "experts": ("a", "a"), "weights": (1.0, 1.0)}, "twice"),
    ({"method": "evo", "experts": (), "weights": ()}, "at least one"),
])
def test_bad_recipes_are_refused_with_a_reason(kwargs, words):
    with pytest.raises(RecipeError, match=None) as err:
        MergeRecipe(**kwargs)
    assert words in str(err.value)


@pytest.mark.parametrize("weights", [["1"], [True], "1", [None]])
def test_weights_must_be_numbers(weights):
    with pytest.raises(RecipeError, match="must hold numbers"):
        MergeRecipe.from_dict({"method": "evo", "experts": ["a"], "weights": weights})


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(RecipeError, match="unknown recipe field"):
        MergeRecipe.from_dict({"method": "evo", "experts": ["a"], "weights": [1], "alpha": [1]})
    with pytest.raises(RecipeError, match="missing the field 'weights'"):
        MergeRecipe.from_dict({"method": "evo", "experts": ["a"]})


def test_block_overrides_take_precedence():
    r = MergeRecipe("task_arithmetic", ("a", "b"), (1.0, 2.0),
                    blocks=(BlockOverride("layers.0-2.mlp", (3.0, 4.0)),))
    assert r.coefficients("layers.0-2.mlp")[0] == (3.0, 4.0)
    assert r.coefficients("layers.0-2.attn")[0] == (1.0, 2.0)
    assert uniform(["a", "b", "c", "d"]).weights == (0.25,) * 4
