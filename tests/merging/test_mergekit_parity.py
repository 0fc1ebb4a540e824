"""mergekit's own `run_merge`, run on the YAML `evomerge export` writes, gives evomerge's merge.

Two of the experts have deltas rounded to 0.01, so many entries tie at the TIES cutoff. There
mergekit keeps whichever tied entries `torch.argsort`'s unstable CPU sort happens to put first (no
defined rule; it changes with tensor size and device), while evomerge keeps the lowest indices. So
TIES must agree exactly everywhere except at entries tied at some expert's cutoff. DARE's masks
are random on both sides (mergekit draws from torch's global generator): there every merged entry
must be one of the values a mask allows, each expert's term dropped or kept and rescaled.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import yaml

from evomerge.blocks import block_of
from evomerge.export import to_mergekit
from evomerge.recipe import BlockOverride, MergeRecipe
from tests.merging import reference as ref

pytest.importorskip("mergekit", reason="mergekit is a test-only dependency (pip install mergekit==0.1.5)")

FULL = ("full0", "full1", "full2")
BLOCKS = (BlockOverride("layers.0-1.attn", (0.2, 1.4, -0.5), (0.6, 0.4, 0.9)),
          BlockOverride("layers.1-2.mlp", (-0.3, 0.5, 0.8)))
RECIPES = {
    "linear": MergeRecipe("linear", FULL, (0.9, 0.35, 0.6)),
    "linear_blocks": MergeRecipe("linear", FULL, (0.9, 0.35, 0.6), blocks=BLOCKS),
    "linear_scaled": MergeRecipe("linear", FULL, (0.9, 0.35, 0.6), scale=0.7),
    "task_arithmetic": MergeRecipe("task_arithmetic", FULL, (0.9, -0.35, 0.6), scale=0.8),
    "task_arithmetic_blocks": MergeRecipe("task_arithmetic", FULL, (0.9, -0.35, 0.6), scale=0.8, blocks=BLOCKS),
    "task_arithmetic_lora": MergeRecipe("task_arithmetic", ("lora0", "lora1", "lora_r2"), (0.9, -0.35, 0.6)),
    "uniform": MergeRecipe("uniform", FULL, (1 / 3,) * 3),
    "evo_tv_alpha_1": MergeRecipe("evo_tv", ("lora0", "lora_r2"), (0.7, -1.2), (1.0, 1.0)),
    "ties": MergeRecipe("ties", FULL, (0.9, -0.35, 0.6), (0.3, 0.5, 0.7), scale=0.8),
    "ties_blocks": MergeRecipe("ties", FULL, (0.9, -0.35, 0.6), (0.3, 0.5, 0.7), scale=0.8, blocks=BLOCKS),
    # β a power of two: the sign vote rounds as mergekit's unweighted one does
    "evo_ties_equal_beta": MergeRecipe("evo_ties", FULL, (0.5, 0.5, 0.5), (0.3, 0.5, 0.7), scale=0.8),
}


def run_exported(recipe: MergeRecipe, repo, out) -> dict[str, np.ndarray]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    path = out.parent / f"{out.name}.yaml"
    path.write_text(to_mergekit(recipe, repo))
    config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0,
                                                lora_merge_cache=str(out.parent / "lora-cache"), lora_merge_dtype="float32"))
    return ref.tensors(out)


def ours(engine, recipe: MergeRecipe) -> dict[str, np.ndarray]:
    engine.apply(recipe)
    return {n: p.detach().double().numpy() for n, p in engine.model.named_parameters()}


def tied_entries(repo_dir, recipe: MergeRecipe, name: str, shape) -> np.ndarray:
    """Entries tied at some expert's TIES cutoff on tensor `name` (where the sorts may differ)."""
    _, taus = ref.task_vectors(repo_dir, list(recipe.experts))
    blocks = tuple(b.name for b in recipe.blocks)
    _, densities = recipe.coefficients(block_of(name, blocks) if blocks else None)
    tied = np.zeros(shape, dtype=bool)
    for tau, d in zip(taus, densities):
        mag = np.abs(tau[name].astype(np.float32))
        k = ref.k_floor(mag.size, d)
        cut = np.sort(mag.reshape(-1))[::-1][k - 1]
        if (mag > cut).sum() + (mag == cut).sum() > k:  # a tie straddles the cutoff
            tied |= mag == cut
    return tied


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_exported_yaml_reproduces_the_merge(engine, tiny_repo, tiny_repo_dir, tmp_path, case):
    recipe = RECIPES[case]
    text = to_mergekit(recipe, tiny_repo)
    assert not text.startswith("#"), text.splitlines()[0]   # nothing it cannot express
    theirs = run_exported(recipe, tiny_repo, tmp_path / "out")
    mine = ours(engine, recipe)
    assert set(theirs) == set(mine)
    base = ref.tensors(tiny_repo_dir / "base")
    tied_somewhere = changed = 0
    for name, t in theirs.items():
        free = ~tied_entries(tiny_repo_dir, recipe, name, t.shape) if "ties" in recipe.method else np.ones(t.shape, bool)
        tied_somewhere += int((~free).sum())
        changed += int(not np.array_equal(mine[name], base[name]))
        atol = 4e-7 * max(1.0, float(np.abs(t).max()))
        np.testing.assert_allclose(mine[name][free], t[free], rtol=0, atol=atol, err_msg=name)
    assert changed > 0
    if "ties" in recipe.method:
        assert tied_somewhere > 0  # the quantised experts did produce ties at the cutoff


def test_block_filters_cover_every_tensor_of_the_block(tiny_repo):
    config = yaml.safe_load(to_mergekit(RECIPES["linear_blocks"], tiny_repo))
    filters = [e["filter"] for e in config["models"][0]["parameters"]["weight"] if "filter" in e]
    assert "model.layers.0.post_attention_layernorm." in filters   # the attention block's norm, too
    assert not any("input_layernorm" in f or "embed" in f for f in filters)


def test_lora_experts_are_base_plus_adapter(tiny_repo):
    config = yaml.safe_load(to_mergekit(RECIPES["task_arithmetic_lora"], tiny_repo))
    base = str(tiny_repo.base.resolve())
    assert [m["model"] for m in config["models"]] == [f"{base}+{tiny_repo.expert(n).path.resolve()}"
                                                       for n in ("lora0", "lora1", "lora_r2")]


@pytest.mark.parametrize("experts, weights, densities", [(("full2",), (0.9,), (0.4,)),
                                                      (("full0", "full2"), (0.9, -0.6), (0.4, 0.7))])
def test_dare_matches_up_to_its_random_masks(engine, tiny_repo, tiny_repo_dir, tmp_path, experts, weights, densities):
    recipe = MergeRecipe("dare", experts, weights, densities, seed=5, scale=0.8)
    assert "--random-seed 5" in to_mergekit(recipe, tiny_repo)
    theirs = run_exported(recipe, tiny_repo, tmp_path / "out")
    mine = ours(engine, recipe)
    base, taus = ref.task_vectors(tiny_repo_dir, list(experts))
    moved = {"theirs": [], "ours": []}
    for name, t in theirs.items():
        terms = [0.8 * w / d * tau[name] for w, d, tau in zip(weights, densities, taus)]
        # each entry is one of the sums a mask allows: each expert's rescaled term dropped or kept
        options = np.stack([sum(term * k for term, k in zip(terms, keep))
                            for keep in itertools.product((0, 1), repeat=len(terms))])
        for side, merged in (("theirs", t), ("ours", mine[name])):
            delta = merged - base[name]
            assert np.abs(options - delta).min(0).max() < 4e-6 * max(1.0, np.abs(merged).max()), (side, name)
            moved[side].append((np.abs(delta) > 1e-9)[np.abs(terms[0]) > 1e-6])
    if len(experts) == 1:  # the kept fraction is the density on both sides
        for side, flags in moved.items():
            assert abs(np.concatenate(flags).mean() - densities[0]) < 0.03, side


def test_evo_ties_with_unequal_betas_says_it_is_not_exact(tiny_repo):
    text = to_mergekit(MergeRecipe("evo_ties", FULL, (0.9, -0.35, 0.6), (0.3, 0.5, 0.7)), tiny_repo)
    assert text.startswith("# Not exact: evo_ties divides")
    config = yaml.safe_load(text)
    assert config["merge_method"] == "ties" and config["parameters"]["lambda"] == pytest.approx((0.9 + 0.35 + 0.6) / 3)
