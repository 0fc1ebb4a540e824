"""The exported adapter and checkpoint, loaded by peft / transformers, answer as the engine's merge did."""

from __future__ import annotations

import json

import pytest
import torch

from evomerge.errors import RecipeError
from evomerge.merging.save import save_adapter, save_checkpoint
from evomerge.recipe import BlockOverride, MergeRecipe

TEXT = "abc 12 = 3, xyz"
ADAPTER_RECIPES = {
    "evo_tv_mixed_ranks": MergeRecipe("evo_tv", ("lora0", "lora1", "lora_r2"), (0.8, -0.6, 1.3), (0.5, 0.9, 0.3),
                                      scale=0.9),
    "evo": MergeRecipe("evo", ("lora0", "lora1", "lora2"), (0.9, -0.7, 1.2), (0.6, 1.0, 0.25)),
    "task_arithmetic_blocks": MergeRecipe("task_arithmetic", ("lora0", "lora_r2", "lora2"), (0.5, 1.1, 0.0),
                                          scale=0.7, blocks=(BlockOverride("layers.1-2.attn", (-0.4, 0.2, 0.9)),)),
    "uniform": MergeRecipe("uniform", ("lora0", "lora1"), (0.5, 0.5)),
    "evo_tsv_mixed_ranks": MergeRecipe("evo_tsv", ("lora0", "lora1", "lora_r2"), (0.8, -0.6, 1.3), (0.5, 1.0, 0.5)),
}


def merged_logits(engine, recipe: MergeRecipe | None) -> torch.Tensor:
    ids = engine.tokenizer(TEXT, return_tensors="pt").input_ids
    with engine.merged(recipe) as model, torch.no_grad():
        return model(ids).logits


def logits_of(model, engine) -> torch.Tensor:
    ids = engine.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("case", sorted(ADAPTER_RECIPES))
def test_adapter_reproduces_the_scored_merge(engine, tiny_repo, tmp_path, case):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = ADAPTER_RECIPES[case]
    out = save_adapter(engine.merger, recipe, tmp_path / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_repo.base), dtype=torch.float32),
                                      str(out))
    want = merged_logits(engine, recipe)
    assert not torch.allclose(want, merged_logits(engine, None), atol=1e-3)  # the merge changes the model
    torch.testing.assert_close(logits_of(model, engine), want, rtol=0, atol=1e-4)


def test_adapter_ranks_are_concatenated_and_zero_weights_take_none(engine, tmp_path):
    recipe = MergeRecipe("evo_tv", ("lora0", "lora_r2", "lora2"), (0.5, 1.0, 0.0))
    out = save_adapter(engine.merger, recipe, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    q = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    v = tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"]
    assert (q.shape[0], v.shape[0]) == (4 + 2, 4)   # lora0 (r=4) and lora_r2 (r=2) on q_proj; lora2 (β=0) nowhere
    assert config["lora_alpha"] == config["r"] == 4
    assert config["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 6
    assert config["alpha_pattern"] == config["rank_pattern"]


@pytest.mark.parametrize("recipe, why", [
    (MergeRecipe("ties", ("lora0", "lora1"), (0.5, 0.5), (0.5, 0.5)), "not low-rank"),
    (MergeRecipe("dare", ("lora0",), (1.0,), (0.5,), seed=1), "not low-rank"),
    (MergeRecipe("evo_tv", ("lora0", "full0"), (0.5, 0.5)), "full checkpoint"),
    (MergeRecipe("evo_tv", ("lora0",), (0.0,)), "changes no tensor"),
])
def test_adapter_refuses_merges_it_cannot_hold(engine, tmp_path, recipe, why):
    with pytest.raises(RecipeError, match=why) as info:
        save_adapter(engine.merger, recipe, tmp_path / "adapter")
    assert "--model" in str(info.value) or why == "changes no tensor"
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("recipe", [
    MergeRecipe("evo", ("lora0", "lora1", "lora2"), (0.9, -0.7, 1.2), (0.6, 1.0, 0.25)),
    MergeRecipe("ties", ("full0", "full1", "full2"), (0.7, -0.4, 0.5), (0.3, 0.55, 0.8), scale=0.9),
    MergeRecipe("dare", ("full0", "lora1"), (0.6, 0.9), (0.5, 0.7), seed=3),
], ids=["lora_evo", "full_ties", "mixed_dare"])
def test_checkpoint_reproduces_the_scored_merge(engine, tiny_repo, tmp_path, recipe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = engine.applied_key
    out = save_checkpoint(engine.merger, recipe, tmp_path / "model")
    assert engine.applied_key == before   # streamed from the repository, not read off the resident model
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(str(out))(TEXT).input_ids == engine.tokenizer(TEXT).input_ids
    with engine.merged(recipe) as resident:
        for (n, p), (m, q) in zip(resident.named_parameters(), model.named_parameters()):
            assert n == m and torch.equal(p, q), n
    torch.testing.assert_close(logits_of(model, engine), merged_logits(engine, recipe), rtol=0, atol=1e-4)
