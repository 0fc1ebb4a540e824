"""The population path: many LoRA candidates scored in shared batched forwards equal each scored alone."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge import inference
from evomerge.backends.local import LocalBackend
from evomerge.merging import population
from evomerge.objectives import Objective
from evomerge.recipe import MergeRecipe
from evomerge.repository import Repository
from tests.helpers import tiny

EXPERTS = ("lora0", "lora1", "lora2")
RECIPES = (
    MergeRecipe("evo_tv", EXPERTS, (0.9, -0.6, 1.3), (0.3, 1.0, 0.6)),
    MergeRecipe("evo", EXPERTS, (1.2, -0.8, 0.0), (0.5, 0.2, 1.0)),  # evo: equal ranks (lora2 off)
    MergeRecipe("task_arithmetic", EXPERTS, (1.5, 0.0, 0.7)),
    MergeRecipe("uniform", EXPERTS, (1.0, 1.0, 1.0)),
    MergeRecipe("evo_tv", EXPERTS, (0.0, 1.4, 0.0), (1.0, 0.4, 1.0)),  # one expert: a lower rank, zero-padded
    MergeRecipe("evo_tsv", EXPERTS, (0.8, 1.1, -0.5), (1.0, 0.5, 1.0)),  # decorrelated over both ranks
)


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory):
    """Adapters of two ranks, strong enough that the merges answer differently."""
    root = tmp_path_factory.mktemp("population_repo")
    base = tiny.build_base(root / "base")
    experts = {}
    for i, r in enumerate((4, 4, 2)):
        tiny.build_lora_expert(base, root / "experts" / f"lora{i}", seed=60 + i, r=r)
        experts[f"lora{i}"] = {"path": f"experts/lora{i}", "kind": "lora", "task": None, "distractor": False}
    return tiny.write_zoo(root, experts)


@pytest.fixture(scope="module")
def backend(repo_dir):
    b = LocalBackend(Repository.open(repo_dir), Objective({"ce": 1.0, "ce_stop": 1.0, "exact_match": 1.0}, "normalized"),
                     device="cpu", dtype="float32", batch_size=4, population_cost=math.inf)
    yield b
    b.close()


def test_population_scores_equal_each_candidate_scored_alone(backend, examples):
    many = backend.evaluate_many(RECIPES, examples)
    alone = [backend.evaluate(r, examples) for r in RECIPES]
    assert all(s.ok for s in many + alone)
    for m, a in zip(many, alone):
        for ce in ("ce", "ce_stop"):
            np.testing.assert_allclose(m.per_example[ce], a.per_example[ce], atol=1e-4, rtol=0)
        assert m.per_example["exact_match"] == a.per_example["exact_match"]
        assert m.loss == pytest.approx(a.loss, abs=1e-4)
    assert len({tuple(np.round(s.per_example["ce"], 3)) for s in alone}) == len(RECIPES)  # the candidates differ


def test_population_generation_gives_each_candidate_its_own_greedy_answers(backend, examples):
    engine, tok = backend.engine, backend.engine.tokenizer
    factors = population.stacked_factors(engine.merger, RECIPES, engine.dtype, engine.device)
    with engine.merged(None) as model, population.population(model, factors):
        rows = list(examples) * len(RECIPES)
        together = inference.generate_answers(model, tok, rows, 6, len(rows))
    for c, recipe in enumerate(RECIPES):
        with engine.merged(recipe) as model:
            alone = inference.generate_answers(model, tok, examples, 6, 3)
        assert together[c * len(examples) : (c + 1) * len(examples)] == alone
    with engine.merged(None) as model:
        assert inference.generate_answers(model, tok, examples, 6, 3) != alone  # the hooks are gone again


def test_the_batch_splits_by_rows_and_mixed_methods_keep_their_own_path(repo_dir, examples, backend):
    """A forward of 4 rows splits 5 candidates x 7 examples into groups and chunks; TIES (not
    low-rank) and a recipe naming an unknown expert are scored alone, the latter failed."""
    small = LocalBackend(Repository.open(repo_dir), backend.objective, device="cpu", dtype="float32",
                         population_rows=4, population_cost=math.inf)
    try:
        ties = MergeRecipe("ties", EXPERTS, (1.0, 0.5, 0.5), (0.5, 0.5, 0.5))
        bad = MergeRecipe("evo_tv", ("lora0", "nobody"), (1.0, 1.0))
        mixed = (*RECIPES, ties, bad)
        many = small.evaluate_many(mixed, examples)
        alone = [backend.evaluate(r, examples) for r in mixed]
    finally:
        small.close()
    assert not many[-1].ok and "nobody" in many[-1].error
    for m, a in zip(many[:-1], alone[:-1]):
        for ce in ("ce", "ce_stop"):
            np.testing.assert_allclose(m.per_example[ce], a.per_example[ce], atol=1e-4, rtol=0)
        assert m.per_example["exact_match"] == a.per_example["exact_match"]


def test_a_search_fed_populations_finds_what_one_at_a_time_finds(repo_dir, examples, monkeypatch):
    """The thread executor hands each asked-ahead window to `evaluate_many`; the seeded search
    asks the same candidates and returns the same recipe as with the population path off."""
    import evomerge
    from evomerge.backends.local import LocalEvaluatorFactory
    from evomerge.search_spaces import build_space
    from evomerge.tasks import Splits

    batches: list[int] = []
    real = LocalBackend.evaluate_many
    monkeypatch.setattr(LocalBackend, "evaluate_many",
                        lambda self, recipes, part: batches.append(len(recipes)) or real(self, recipes, part))
    splits = Splits(tuple(examples[:5]), tuple(examples[5:]), ())
    objective = Objective({"ce": 1.0, "exact_match": 1.0}, "normalized")
    runs = {}
    for population_on in (True, False):
        factory = LocalEvaluatorFactory(str(repo_dir), splits, objective, device="cpu", dtype="float32",
                                        population=population_on, population_cost=math.inf)
        runs[population_on] = evomerge.search(space=build_space("evo_joint", list(EXPERTS)), evaluator=factory,
                                              budget=24, seed=0)
        if population_on:
            assert batches and max(batches) > 1 and sum(batches) >= 12  # windows went through together
            batches.clear()
    assert not batches  # with the path off, every candidate was scored alone
    on, off = runs[True], runs[False]
    assert len(on.trials) == len(off.trials)
    for a, b in zip(on.trials, off.trials):
        np.testing.assert_allclose(np.asarray(a.z, dtype=float), np.asarray(b.z, dtype=float), atol=1e-6)
    assert on.best_recipe == off.best_recipe


def test_on_a_cpu_a_recipe_whose_low_rank_path_costs_more_than_a_merge_goes_alone(repo_dir, examples):
    """By default on a CPU a candidate joins a population forward only while its low-rank path
    adds little beside the base layers: one adapter does, all three summed (rank 10 on 32-wide
    layers) do not; the scores are the same either way."""
    b = LocalBackend(Repository.open(repo_dir), Objective("ce"), device="cpu", dtype="float32")
    try:
        cheap = MergeRecipe("evo_tv", EXPERTS, (0.0, 0.0, 1.0), (1.0, 1.0, 0.5))
        dear = RECIPES[0]
        merger = b.engine.merger
        assert merger.low_rank_cost(cheap) <= b.population_cost < merger.low_rank_cost(dear)
        assert b._low_rank(cheap) and not b._low_rank(dear)
        many = b.evaluate_many([dear, cheap, dear], examples)
        np.testing.assert_allclose(many[1].per_example["ce"], b.evaluate(cheap, examples).per_example["ce"], atol=1e-4)
        assert many[0].per_example == many[2].per_example == b.evaluate(dear, examples).per_example
    finally:
        b.close()


def test_an_invalid_recipe_never_joins_a_batch_and_costs_are_remembered(backend, monkeypatch):
    """`Merger.stays_low_rank` answers False (never raises) for a recipe that fails on its own
    path; a recipe's low-rank cost is worked out once, however often it is asked."""
    merger = backend.engine.merger
    zero_sum = MergeRecipe("linear", ("lora0", "lora1"), (1.0, -1.0))
    assert not merger.stays_low_rank(zero_sum, 1.0) and merger.stays_low_rank(zero_sum)  # the cost raises
    assert not merger.stays_low_rank(MergeRecipe("evo_tv", ("lora0", "nobody"), (1.0, 1.0)))
    assert not merger.stays_low_rank(MergeRecipe("ties", EXPERTS, (1.0, 0.5, 0.5), (0.5, 0.5, 0.5)))
    assert merger.stays_low_rank(RECIPES[0], math.inf) and not merger.stays_low_rank(RECIPES[0], 0.0)
    worked = []
    real = type(merger)._low_rank_cost
    monkeypatch.setattr(type(merger), "_low_rank_cost", lambda self, r: worked.append(r) or real(self, r))
    fresh = MergeRecipe("evo_tv", EXPERTS, (0.2, 0.3, 0.4))
    costs = {merger.low_rank_cost(fresh) for _ in range(3)}
    assert worked == [fresh] and costs == {real(merger, fresh)} and costs != {0.0}
    assert merger.low_rank_cost(MergeRecipe("evo_tv", EXPERTS, (0.2, 0.3, 0.4))) in costs and len(worked) == 1
