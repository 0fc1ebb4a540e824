"""The engine patches a resident model in place: restores, skips repeats, survives failures, serialises threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from evomerge.errors import RecipeError
from evomerge.recipe import MergeRecipe
from tests.merging import reference as ref


def logits(engine) -> torch.Tensor:
    ids = engine.tokenizer("abc 12", return_tensors="pt").input_ids
    with torch.no_grad():
        return engine.model(ids).logits


def test_apply_changes_outputs_and_none_restores_base(engine, tiny_repo_dir):
    engine.apply(None)
    before = logits(engine)
    engine.apply(MergeRecipe("evo", ("lora0", "lora1"), (0.5, 0.5), (0.5, 1.0)))
    assert not torch.allclose(logits(engine), before)
    engine.apply(MergeRecipe("task_arithmetic", ("full0",), (1.0,)))
    engine.apply(None)
    torch.testing.assert_close(logits(engine), before, rtol=0, atol=0)
    base = ref.tensors(tiny_repo_dir / "base")
    for n, p in engine.model.named_parameters():
        np.testing.assert_array_equal(p.detach().double().numpy(), base[n])


def test_switching_from_full_to_lora_restores_untouched_tensors(engine, tiny_repo_dir):
    engine.apply(MergeRecipe("uniform", ("full0", "full1"), (0.5, 0.5)))
    engine.apply(MergeRecipe("evo_tv", ("lora0",), (1.0,)))
    base = ref.tensors(tiny_repo_dir / "base")
    norm = engine.model.get_parameter("model.norm.weight").detach().double().numpy()
    np.testing.assert_array_equal(norm, base["model.norm.weight"])


def test_same_recipe_is_not_merged_twice(engine, monkeypatch):
    recipe = MergeRecipe("evo", ("lora0", "lora2"), (0.3, 0.7))
    engine.apply(recipe)
    calls = []
    original = engine.merger.deltas
    monkeypatch.setattr(engine.merger, "deltas", lambda *a: calls.append(1) or original(*a))
    engine.apply(MergeRecipe.from_dict(recipe.to_dict()))
    assert calls == []
    engine.apply(MergeRecipe("evo", ("lora0", "lora2"), (0.3, 0.71)))
    assert calls == [1]


def test_failed_recipe_leaves_the_base_model(engine, tiny_repo_dir):
    engine.apply(MergeRecipe("task_arithmetic", ("full1",), (1.0,)))
    with pytest.raises(RecipeError, match="sum to zero"):
        engine.apply(MergeRecipe("linear", ("full0", "full1"), (1.0, -1.0)))
    assert engine.applied_key == ""
    base = ref.tensors(tiny_repo_dir / "base")
    np.testing.assert_array_equal(engine.model.get_parameter("lm_head.weight").detach().double().numpy(),
                                  base["lm_head.weight"])


def test_threads_see_their_own_merge(engine):
    recipes = [MergeRecipe("evo", ("lora0", "lora1"), (b, 1 - b)) for b in (0.1, 0.5, 0.9)]
    expected = {}
    for r in recipes:
        with engine.merged(r) as model:
            expected[r.key()] = model.get_parameter("model.layers.0.self_attn.q_proj.weight").detach().clone()
    errors = []

    def worker(i: int) -> None:
        for j in range(6):
            r = recipes[(i + j) % 3]
            with engine.merged(r) as model:
                got = model.get_parameter("model.layers.0.self_attn.q_proj.weight")
                if not torch.equal(got, expected[r.key()]):
                    errors.append((i, j))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_save_writes_a_loadable_merged_model(engine, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = MergeRecipe("ties", ("full0", "lora1"), (0.6, 0.9), (0.5, 0.5))
    out = engine.save(recipe, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with engine.merged(recipe) as model:
        for (n, p), (m, q) in zip(model.named_parameters(), reloaded.named_parameters()):
            assert n == m and torch.equal(p, q)
