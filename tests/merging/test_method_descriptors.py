"""Every registered `MergeMethod` says what the merge engine, the spaces and the export really do.

Each claim of a descriptor is checked against a real merge of the tiny repository, so a
descriptor that lies (a method declared low-rank that materialises ΔW, densities declared ignored
that change the merge, a mergekit name mergekit does not accept) fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from evomerge.errors import ConfigError, RecipeError
from evomerge.export import to_mergekit
from evomerge.merging import KERNELS, Merger
from evomerge.merging import lora as lora_forms
from evomerge.merging.methods import Contribution
from evomerge.recipe import METHODS, MergeRecipe, effective_weights
from evomerge.repository import TensorReader
from evomerge.search_spaces import ClassicSpace, EvoSpace, baseline, build_space
from tests.merging import reference as ref

FULL = ("full0", "full1", "full2")
LORA = ("lora0", "lora1", "lora2")  # one rank, so the factor form applies too
WEIGHTS, DENSITIES = (0.7, -0.4, 0.5), (0.3, 0.55, 0.8)
NAMES = list(METHODS)


@pytest.fixture(scope="module")
def merger(tiny_repo):
    m = Merger(tiny_repo, "cpu")
    yield m
    m.close()


@pytest.fixture(scope="module")
def merged(merger, tiny_repo):
    """(method, experts, weights, densities, seed) -> every tensor's ΔW, as the engine adds it."""
    reader = TensorReader()

    def merge(method: str, experts=FULL, weights=WEIGHTS, densities=DENSITIES, seed=0) -> dict:
        recipe = MergeRecipe(method, experts, weights, densities, scale=0.9, seed=seed)
        return dict(merger.deltas(recipe, lambda name: reader.get(tiny_repo.base_files, name)))

    yield merge
    reader.close()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_the_descriptor_names_a_registered_kernel_and_lora_form(name):
    method = METHODS[name]
    assert method.name == name and method.kernel in KERNELS
    assert method.lora == "dense" or method.lora in lora_forms.FACTORS
    assert method.low_rank == (method.lora != "dense")


@pytest.mark.parametrize("name", NAMES)
def test_low_rank_methods_merge_lora_factors_and_dense_ones_refuse(merger, tiny_repo_dir, name):
    method = METHODS[name]
    recipe = MergeRecipe(name, LORA, WEIGHTS, (1.0,) * 3, scale=0.9)
    assert merger.stays_low_rank(recipe) == method.low_rank
    if not method.low_rank:
        assert "not low-rank" in merger.low_rank_refusal(recipe)
        with pytest.raises(RecipeError, match="no adapter form"):
            list(merger.low_rank(recipe))
        return
    factors = [ref.lora_factors(tiny_repo_dir / "experts" / n) for n in LORA]
    weights = effective_weights(name, WEIGHTS)
    for target, b, a in merger.low_rank(recipe):
        ranks = [f[target][0].shape[0] for f, _ in factors]
        assert a.shape[0] == (ranks[0] if method.lora == "factors" else sum(ranks)) < min(a.shape[1], b.shape[0])
        if method.lora == "concat":  # linear in the updates: the method's own merge of each dense ΔW_i
            updates = [torch.from_numpy(s * f[target][1] @ f[target][0]).float() for f, s in factors]
            contribs = [Contribution(n, w, 1.0, u.clone) for n, w, u in zip(LORA, weights, updates)]
            dense = KERNELS[method.kernel](contribs, target, None)
            torch.testing.assert_close(b @ a, 0.9 * dense, rtol=0, atol=1e-6)


@pytest.mark.parametrize("experts", [FULL, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("name", NAMES)
def test_densities_change_the_merge_exactly_when_declared(merged, name, experts):
    assert (not same(merged(name, experts), merged(name, experts, densities=None))) == METHODS[name].densities


@pytest.mark.parametrize("name", NAMES)
def test_only_a_stochastic_method_depends_on_the_seed(merged, name):
    assert (not same(merged(name, seed=0), merged(name, seed=1))) == METHODS[name].stochastic


@pytest.mark.parametrize("name", NAMES)
def test_the_weighting_and_the_disjoint_mean_say_which_weights_matter(merged, name):
    method = METHODS[name]
    doubled = tuple(2 * w for w in (0.7, 0.4, 0.5))  # exact in floating point: a ratio-only merge is unchanged
    scale_free = same(merged(name, weights=(0.7, 0.4, 0.5)), merged(name, weights=doubled))
    assert scale_free == (method.weighting != "as_given" or method.disjoint_mean == "weights")
    ignored = same(merged(name), merged(name, weights=(1.0, 2.0, 3.0)))
    assert ignored == (method.weighting == "uniform")


@pytest.mark.parametrize("name", NAMES)
def test_the_family_says_which_spaces_search_the_method(name):
    family = METHODS[name].family
    if family == "classic":
        space = build_space(name, FULL)
        assert space.decode(space.x0) == baseline(name, FULL)
    if family == "evo":
        assert EvoSpace(FULL, method=name).decode(np.zeros(6)).method == name
    else:
        with pytest.raises(ConfigError, match="evo spaces merge with"):
            EvoSpace(FULL, method=name)
    if family != "classic":
        with pytest.raises(ConfigError, match="unknown classic merge method"):
            ClassicSpace(name, FULL)
    if family == "baseline":
        assert baseline(name, FULL).method == name


@pytest.mark.parametrize("name", NAMES)
def test_the_mergekit_name_exports_a_config_mergekit_accepts(tiny_repo, name):
    method = METHODS[name]
    recipe = MergeRecipe(name, FULL, (0.7, 0.4, 0.5), DENSITIES, scale=0.9, seed=0)
    config = yaml.safe_load(to_mergekit(recipe, tiny_repo))
    assert config["merge_method"] == method.mergekit
    assert all(("density" in m["parameters"]) == method.mergekit_density for m in config["models"])
    assert config["parameters"]["normalize"] == (method.disjoint_mean is not None)
    assert config["parameters"].get("rescale", True) != method.stochastic
    pytest.importorskip("mergekit", reason="mergekit is a test-only dependency (pip install mergekit==0.1.5)")
    from mergekit import merge_methods
    from mergekit.config import MergeConfiguration

    MergeConfiguration.model_validate(config)
    merge_methods.get(method.mergekit)  # raises for a name mergekit does not implement
