"""Our task arithmetic and TIES equal mergekit's `run_merge` on the same real checkpoints.

Two of the experts have deltas rounded to 0.01, so many entries tie at the TIES cutoff. There
mergekit keeps whichever tied entries `torch.argsort`'s unstable CPU sort happens to put first (no
defined rule; it changes with tensor size and device), while evomerge keeps the lowest indices. So
TIES must agree exactly everywhere except at entries tied at some expert's cutoff, and keep the
same number of entries per expert.
"""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.recipe import MergeRecipe
from tests.merging import reference as ref

pytest.importorskip("mergekit", reason="mergekit is a test-only dependency (pip install mergekit==0.1.5)")

FULL = ("full0", "full1", "full2")


def run_mergekit(repo_dir, out, method, weights, densities, scale):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    models = []
    for name, w, d in zip(FULL, weights, densities):
        params = {"weight": w}
        if method == "ties":
            params["density"] = d
        models.append({"model": str(repo_dir / "experts" / name), "parameters": params})
    config = MergeConfiguration.model_validate({
        "merge_method": method, "base_model": str(repo_dir / "base"), "models": models,
        "parameters": {"lambda": scale, **({"normalize": True} if method == "ties" else {})},
        "dtype": "float32"})
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return ref.tensors(out)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_matches_mergekit(engine, tiny_repo_dir, tmp_path, method):
    weights, densities, scale = (0.9, -0.35, 0.6), (0.3, 0.5, 0.7), 0.8
    theirs = run_mergekit(tiny_repo_dir, tmp_path / "out", method, weights, densities, scale)
    engine.apply(MergeRecipe(method, FULL, weights, densities if method == "ties" else None, scale=scale))
    ours = {n: p.detach().double().numpy() for n, p in engine.model.named_parameters()}
    assert set(theirs) == set(ours)
    base, taus = ref.task_vectors(tiny_repo_dir, list(FULL))
    tied_somewhere = 0
    for name, t in theirs.items():
        free = np.ones(t.shape, dtype=bool)
        if method == "ties":
            for tau, d in zip(taus, densities):
                mag = np.abs(tau[name].astype(np.float32))
                k = ref.k_floor(mag.size, d)
                cut = np.sort(mag.reshape(-1))[::-1][k - 1]
                if (mag > cut).sum() + (mag == cut).sum() > k:  # a tie straddles the cutoff
                    free &= mag != cut
        tied_somewhere += int((~free).sum())
        atol = 2e-7 * max(1.0, float(np.abs(t).max()))
        np.testing.assert_allclose(ours[name][free], t[free], rtol=0, atol=atol, err_msg=name)
    if method == "ties":
        assert tied_somewhere > 0  # the quantised experts did produce ties at the cutoff
