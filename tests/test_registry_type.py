"""The one `Registry` type behind every family: collisions raise, unknown names list the choices."""

from __future__ import annotations

import pytest

from evomerge.backends._base import BACKENDS
from evomerge.errors import ConfigError, RecipeError
from evomerge.optimizers import OPTIMIZERS
from evomerge.recipe import METHODS
from evomerge.registry import Registry
from evomerge.search_spaces import SPACES


def _colours() -> Registry[int]:
    reg: Registry[int] = Registry("colour")
    reg.add("red", 1, aliases=("rouge",))
    reg.register("green")(2)
    return reg


def test_a_taken_name_raises():
    reg = _colours()
    with pytest.raises(ConfigError, match="colour name 'red' is registered twice"):
        reg.add("red", 3)
    with pytest.raises(ConfigError, match="'rouge' is registered twice"):
        reg.add("rouge", 3)  # a name that is another entry's alias
    assert reg["red"] == 1 and reg["rouge"] == 1


def test_a_taken_alias_raises_and_registers_nothing():
    reg = _colours()
    with pytest.raises(ConfigError, match="'green' is registered twice"):
        reg.add("blue", 3, aliases=("green",))
    with pytest.raises(ConfigError, match="'rouge' is registered twice"):
        reg.register("blue", aliases=("azure", "rouge"))(3)
    with pytest.raises(ConfigError, match="'azure' is registered twice"):
        reg.add("blue", 3, aliases=("azure", "azure"))
    assert "blue" not in reg and "azure" not in reg and reg["green"] == 2


def test_an_unknown_name_names_the_known_keys_on_one_line():
    reg = _colours()
    with pytest.raises(ConfigError) as info:
        reg["blue"]
    assert str(info.value) == "unknown colour 'blue'; choose one of green, red"
    assert list(reg) == ["red", "green"] and len(reg) == 2 and reg.values() == [1, 2]
    assert "rouge" in reg and "blue" not in reg and 1 not in reg


def test_folded_case_and_what_else_is_accepted():
    reg: Registry[int] = Registry("optimizer", error=RecipeError, fold_case=True, also="ng:<name>")
    reg.add("CMA", 1)
    assert reg["cma"] == reg["Cma"] == 1 and "cMa" in reg and list(reg) == ["cma"]
    with pytest.raises(RecipeError, match=r"^unknown optimizer 'adam'; choose one of cma or ng:<name>$"):
        reg["adam"]


def test_every_family_is_a_registry():
    for family in (METHODS, OPTIMIZERS, SPACES, BACKENDS):
        assert isinstance(family, Registry)
    with pytest.raises(RecipeError, match="unknown merge method 'nope'"):
        METHODS["nope"]
    with pytest.raises(ConfigError, match="optimizer name 'cma' is registered twice"):
        OPTIMIZERS.add("CMA", OPTIMIZERS["cma"])
