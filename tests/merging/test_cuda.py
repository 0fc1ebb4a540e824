"""On a CUDA device the engine merges as on the CPU, with full experts kept resident on the device.

Skipped where no GPU is present (CI); run on a lent GPU (benchmarks/RESULTS.md says where it ran).
"""

from __future__ import annotations

import pytest
import torch

from evomerge.recipe import MergeRecipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RECIPES = {
    "evo": MergeRecipe("evo", ("lora0", "lora1", "lora2"), (0.5, -0.3, 0.8), (0.6, 1.0, 0.3)),
    "evo_tv": MergeRecipe("evo_tv", ("lora0", "lora_r2"), (0.9, 0.4), (0.5, 0.8)),
    "task_arithmetic": MergeRecipe("task_arithmetic", ("full0", "full1", "full2"), (0.4, -0.2, 0.7)),
    "ties": MergeRecipe("ties", ("full0", "full1", "full2", "lora1"), (0.6, 0.9, 0.3, 0.5), (0.5, 0.3, 0.7, 0.5)),
    "dare": MergeRecipe("dare", ("full0", "full2"), (0.6, 0.5), (0.5, 0.7), seed=3),
    "evo_full": MergeRecipe("evo", ("full0", "full1"), (0.5, 0.5), (0.2, 0.9)),
}


@pytest.fixture(scope="module")
def cuda_engine(tiny_repo):
    from evomerge.merging import MergeEngine

    eng = MergeEngine(tiny_repo, device="cuda", dtype="float32")
    yield eng
    eng.close()


@pytest.mark.parametrize("name", RECIPES)
def test_cuda_merge_equals_cpu_merge(engine, cuda_engine, name):
    engine.apply(RECIPES[name])
    cuda_engine.apply(RECIPES[name])
    assert next(cuda_engine.model.parameters()).is_cuda
    for key, cpu in engine.model.named_parameters():
        gpu = cuda_engine.model.get_parameter(key).detach().cpu()
        torch.testing.assert_close(gpu, cpu.detach(), rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def test_full_experts_stay_resident_on_the_device(cuda_engine):
    cuda_engine.apply(RECIPES["task_arithmetic"])
    resident = cuda_engine.merger._resident
    assert {expert for expert, _ in resident} == {"full0", "full1", "full2"}
    assert all(t.device.type == "cuda" for t in resident.values())
    before = dict(resident)
    cuda_engine.apply(RECIPES["ties"])  # a second candidate reuses them instead of reading the files again
    assert all(cuda_engine.merger._resident[k] is t for k, t in before.items())


def test_default_engine_device_is_cuda(tiny_repo):
    from evomerge.merging import MergeEngine

    eng = MergeEngine(tiny_repo)
    try:
        assert eng.device.type == "cuda" and eng.dtype == torch.bfloat16
        assert next(eng.model.parameters()).is_cuda
    finally:
        eng.close()


@pytest.mark.parametrize("k", [1, 1000, 40000, 69999, 70000])
def test_selection_on_the_device_matches_sorting(k):
    import numpy as np

    from evomerge.merging.sparsify import RADIX_MIN, mask_from, select
    from tests.merging import reference as ref

    gen = torch.Generator().manual_seed(k)
    x = (torch.randn(70000, generator=gen) * 3).round(decimals=2)  # many ties at any cutoff
    x[:5] = 0.0
    assert x.numel() >= RADIX_MIN
    mask, cut = select(x.cuda(), k)
    np.testing.assert_array_equal(mask.cpu().numpy(), ref.top_mask(x.numpy(), k))
    np.testing.assert_array_equal(mask_from(x.cuda(), *cut).cpu().numpy(), mask.cpu().numpy())


def test_the_population_path_never_waits_on_the_device_per_candidate(cuda_engine):
    """Stacking many candidates' factors and each hooked Linear's per-candidate update issue no
    synchronising call (a blocking copy, .item(), a data-dependent branch): CUDA's sync debug mode
    raises on one. (The model's own forward, transformers' code, is left out of the check.)"""
    from evomerge.merging import population

    recipes = [RECIPES["evo"], RECIPES["evo_tv"]] * 4
    engine = cuda_engine
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        factors = population.stacked_factors(engine.merger, recipes, engine.dtype, engine.device)
        name = next(iter(factors))
        linear = engine.model.get_submodule(name[: -len(population.SUFFIX)])
        x = torch.ones((len(recipes), 3, linear.in_features), device="cuda")
        with population.population(engine.model, factors), torch.no_grad():
            out = linear(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape[0] == len(recipes) and not torch.equal(out[0].cpu(), out[1].cpu())
