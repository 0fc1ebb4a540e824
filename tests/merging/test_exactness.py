"""Each merge method, applied in place by the engine, equals a float64 reference within float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.blocks import block_of
from evomerge.errors import RecipeError
from evomerge.recipe import BlockOverride, MergeRecipe
from tests.merging import reference as ref

FULL = ["full0", "full1", "full2"]
LORA = ["lora0", "lora1", "lora2"]


def weights_of(engine) -> dict[str, np.ndarray]:
    return {n: p.detach().double().numpy().copy() for n, p in engine.model.named_parameters()}


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name, w in want.items():
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(got[name], w, rtol=0, atol=4e-7 * scale, err_msg=name)


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "uniform", "ties", "evo_ties", "evo"])
def test_full_expert_methods_match_float64_reference(engine, tiny_repo_dir, method):
    w, d = [0.7, -0.4, 0.5], [0.3, 0.55, 0.8]
    recipe = MergeRecipe(method, tuple(FULL), tuple(w), tuple(d), scale=0.9)
    engine.apply(recipe)
    base, taus = ref.task_vectors(tiny_repo_dir, FULL)
    want = {}
    for name, theta0 in base.items():
        t = [tau[name] for tau in taus]
        if method == "task_arithmetic":
            delta = sum(wi * ti for wi, ti in zip(w, t))
        elif method == "linear":
            delta = sum(wi * ti for wi, ti in zip(w, t)) / sum(w)
        elif method == "uniform":
            delta = sum(t) / len(t)
        elif method in ("ties", "evo_ties"):
            delta = ref.ties(t, w, d, by_count=method == "evo_ties")
        else:
            delta = sum(wi * ti * ref.top_mask(ti, ref.k_round(ti.size, di)) for wi, ti, di in zip(w, t, d))
        want[name] = theta0 + 0.9 * delta
    assert_close(weights_of(engine), want)


def test_lora_evo_combines_factors_separately(engine, tiny_repo_dir):
    beta, alpha = [0.8, -0.5, 1.2], [0.6, 1.0, 0.25]
    engine.apply(MergeRecipe("evo", tuple(LORA), tuple(beta), tuple(alpha)))
    base = ref.tensors(tiny_repo_dir / "base")
    factors = [ref.lora_factors(tiny_repo_dir / "experts" / n) for n in LORA]
    want = {}
    for target in factors[0][0]:
        a_m = sum(b * ref.top_mask(f[target][0], ref.k_round(f[target][0].size, a)) * f[target][0]
                  for (f, _), b, a in zip(factors, beta, alpha))
        b_m = sum(b * s * f[target][1] for (f, s), b in zip(factors, beta))
        want[target] = base[target] + b_m @ a_m
    got = weights_of(engine)
    assert_close(got, want)
    untouched = "model.layers.0.self_attn.k_proj.weight"
    np.testing.assert_array_equal(got[untouched], base[untouched])


def test_lora_evo_tv_accepts_mixed_ranks(engine, tiny_repo_dir):
    names, beta, alpha = ["lora0", "lora_r2"], [0.6, -1.1], [0.5, 0.9]
    engine.apply(MergeRecipe("evo_tv", tuple(names), tuple(beta), tuple(alpha)))
    base = ref.tensors(tiny_repo_dir / "base")
    want = {k: v.copy() for k, v in base.items()}
    for n, b, a in zip(names, beta, alpha):
        f, s = ref.lora_factors(tiny_repo_dir / "experts" / n)
        for target, (fa, fb) in f.items():
            want[target] += b * s * fb @ (fa * ref.top_mask(fa, ref.k_round(fa.size, a)))
    assert_close(weights_of(engine), want)


def test_lora_evo_rejects_mixed_ranks_and_restores_base(engine, tiny_repo_dir):
    with pytest.raises(RecipeError, match="evo_tv"):
        engine.apply(MergeRecipe("evo", ("lora0", "lora_r2"), (0.5, 0.5)))
    base = ref.tensors(tiny_repo_dir / "base")
    assert_close(weights_of(engine), base)
    assert engine.applied_key == ""


@pytest.mark.parametrize("method, cached", [("ties", True), ("ties", False), ("evo_ties", True)])
def test_classic_methods_materialise_lora_task_vectors(engine, tiny_repo_dir, monkeypatch, method, cached):
    if not cached:  # the second pass re-derives each trimmed delta from its recorded cutoff
        monkeypatch.setattr("evomerge.merging.methods.TIES_CACHE_BYTES", 0)
    engine.apply(None)  # the shared engine would skip a recipe already in its weights
    w, d = [0.5, 1.0, -0.3], [0.5, 0.5, 0.5]
    engine.apply(MergeRecipe(method, tuple(LORA), tuple(w), tuple(d)))
    base = ref.tensors(tiny_repo_dir / "base")
    factors = [ref.lora_factors(tiny_repo_dir / "experts" / n) for n in LORA]
    want = dict(base)
    for target in factors[0][0]:
        taus = [s * f[target][1] @ f[target][0] for f, s in factors]
        want[target] = base[target] + ref.ties(taus, w, d, by_count=method == "evo_ties")
    assert_close(weights_of(engine), want)


def test_block_overrides_change_only_their_block(engine, tiny_repo_dir):
    block = "layers.1-2.mlp"
    recipe = MergeRecipe("task_arithmetic", tuple(FULL), (0.2, 0.3, 0.4),
                         blocks=(BlockOverride(block, (-1.0, 0.0, 2.0)),))
    engine.apply(recipe)
    base, taus = ref.task_vectors(tiny_repo_dir, FULL)
    want = {}
    for name, theta0 in base.items():
        w = (-1.0, 0.0, 2.0) if block_of(name, (block,)) == block else (0.2, 0.3, 0.4)
        want[name] = theta0 + sum(wi * tau[name] for wi, tau in zip(w, taus))
    assert "model.layers.1.mlp.up_proj.weight" in want and block_of("model.layers.0.mlp.up_proj.weight", (block,)) is None
    assert_close(weights_of(engine), want)


def test_dare_is_seeded_rescaled_and_density_sized(engine, tiny_repo_dir):
    base, (tau,) = ref.task_vectors(tiny_repo_dir, ["full2"])
    name = "model.embed_tokens.weight"
    engine.apply(MergeRecipe("dare", ("full2",), (1.0,), (0.3,), seed=7))
    first = weights_of(engine)[name] - base[name]
    kept = first != 0
    assert abs(kept.mean() - 0.3) < 0.05
    np.testing.assert_allclose(first[kept], tau[name][kept] / 0.3, rtol=1e-5, atol=1e-7)
    engine.apply(MergeRecipe("dare", ("full2",), (1.0,), (0.3,), seed=8))
    assert not np.array_equal(weights_of(engine)[name] - base[name] != 0, kept)
    engine.apply(MergeRecipe("dare", ("full2",), (1.0,), (0.3,), seed=7))
    np.testing.assert_array_equal(weights_of(engine)[name] - base[name], first)


def test_topk_ties_go_to_lower_index():
    from evomerge.merging.sparsify import topk_mask

    x = torch.tensor([0.5, -1.0, 0.5, 0.5, 2.0, -0.5])
    assert topk_mask(x, 3).tolist() == [True, True, False, False, True, False]
    assert topk_mask(x, 0).sum() == 0 and topk_mask(x, 6).all()
    y = torch.randn(50, 40).round(decimals=1)
    for k in (1, 17, 999, 1999):
        np.testing.assert_array_equal(topk_mask(y, k).numpy(), ref.top_mask(y.numpy(), k))


@pytest.mark.parametrize("k", [1, 1000, 40000, 69999, 70000])
def test_radix_cutoff_matches_sorting_on_large_tensors(k):
    from evomerge.merging.sparsify import RADIX_MIN, topk_mask

    gen = torch.Generator().manual_seed(k)
    x = (torch.randn(70000, generator=gen) * 3).round(decimals=2)  # many ties
    x[:5] = 0.0
    assert x.numel() >= RADIX_MIN
    np.testing.assert_array_equal(topk_mask(x, k).numpy(), ref.top_mask(x.numpy(), k))


def test_magnitude_ranks_give_the_masks_of_sorting_per_row():
    from evomerge.merging.sparsify import magnitude_ranks

    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 500, generator=gen)).round(decimals=1)
    x[2] = 0.25  # one row all ties
    x[3, :7] = -x[3, 7:14]  # ties of opposite sign
    ranks = magnitude_ranks(x)
    for i in range(x.shape[0]):
        for k in (0, 1, 137, 250, 499, 500):
            np.testing.assert_array_equal((ranks[i] < k).numpy(), ref.top_mask(x[i].numpy(), k), err_msg=f"row {i} k {k}")
