"""The local backend merges in memory and scores a real tiny transformer with the shared scorers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from evomerge import inference
from evomerge.backends.local import LocalBackend, LocalEvaluatorFactory
from evomerge.objectives import Objective
from evomerge.recipe import MergeRecipe
from evomerge.repository import Repository
from evomerge.tasks import Splits

ZERO = MergeRecipe("evo_tv", ("lora0", "lora1"), (0.0, 0.0))
MIX = MergeRecipe("evo", ("lora0", "lora1"), (0.7, -0.4), (0.5, 1.0))


@pytest.fixture(scope="module")
def backend(local_repo_dir):
    b = LocalBackend(Repository.open(local_repo_dir), Objective("ce"), device="cpu", batch_size=3)
    yield b
    b.close()


def test_ce_score_is_per_task_mean_of_shared_scorer(backend, examples):
    score = backend.evaluate(ZERO, examples)
    assert score.ok and score.cost.seconds > 0
    with backend.engine.merged(None) as model:
        ce = inference.answer_cross_entropy(model, backend.engine.tokenizer, examples, 8)
    assert score.example_ids == tuple(e.id for e in examples)
    np.testing.assert_allclose(score.per_example["ce"], ce, rtol=1e-5)
    assert score.loss == pytest.approx((ce[:4].mean() + ce[4:].mean()) / 2, rel=1e-5)
    assert score.metrics["ce/add"] == pytest.approx(ce[:4].mean(), rel=1e-5)
    assert score.metrics["ce"] == pytest.approx(ce.mean(), rel=1e-5)


def test_recipes_change_the_loss_deterministically(backend, examples):
    a, b, again = (backend.evaluate(r, examples) for r in (MIX, ZERO, MIX))
    assert a.loss != pytest.approx(b.loss)
    assert a.loss == again.loss


def test_a_finish_after_a_minibatch_scores_only_the_rest(local_repo_dir, examples):
    """Racing's finish: the model scores the examples its minibatch did not, and the score
    equals a fresh evaluation on all of them."""
    b = LocalBackend(local_repo_dir, Objective({"ce": 1.0, "exact_match": 1.0}, "normalized"), device="cpu")
    seen, scores = [], b.scores
    b.scores = lambda recipe, part, length: seen.append((recipe, len(part))) or scores(recipe, part, length)
    try:
        mini = b.evaluate(MIX, examples[:3])
        full = b.evaluate(MIX, examples)
        assert [n for r, n in seen if r is not None] == [3, len(examples) - 3]
        assert full.per_example["ce"][:3] == mini.per_example["ce"]
        fresh = LocalBackend(local_repo_dir, b.objective, device="cpu")
        try:
            expected = fresh.evaluate(MIX, examples)
        finally:
            fresh.close()
        assert full.loss == pytest.approx(expected.loss, rel=1e-5)
        assert full.per_example["exact_match"] == expected.per_example["exact_match"]
        b.evaluate(ZERO, examples[:3])  # another recipe: scored afresh
        assert [n for r, n in seen if r is not None][-1] == 3
    finally:
        b.close()


def test_bad_candidate_is_a_failed_score(backend, examples):
    score = backend.evaluate(MergeRecipe("evo", ("lora0", "ghost"), (0.5, 0.5)), examples)
    assert not score.ok and "ghost" in score.error
    assert backend.evaluate(ZERO, examples).ok


def test_generation_metrics_and_normalized_aggregate(local_repo_dir, examples):
    b = LocalBackend(local_repo_dir, Objective({"ce": 1.0, "exact_match": 1.0}, "normalized"), device="cpu")
    try:
        score = b.evaluate(ZERO, examples)
        assert set(score.per_example) == {"ce", "exact_match"}
        assert set(score.per_example["exact_match"]) <= {0.0, 1.0}
        assert score.loss == pytest.approx(1.0)  # a zero-weight merge is the base: its own reference
        assert b.evaluate(MIX, examples).loss != pytest.approx(1.0)
    finally:
        b.close()


def test_factory_pickles_and_builds_a_split_evaluator(local_repo_dir, examples):
    splits = Splits(fit=examples[:5], validation=examples[5:], test=())
    factory = pickle.loads(pickle.dumps(LocalEvaluatorFactory(str(local_repo_dir), splits, Objective("ce"), device="cpu")))
    evaluator = factory()
    fit, val = evaluator(MIX, "fit"), evaluator(MIX, "validation")
    assert fit.ok and val.ok and len(fit.example_ids) == 5 and len(val.example_ids) == 2


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backend_scores_as_the_cpu_backend(local_repo_dir, examples):
    gpu = LocalBackend(Repository.open(local_repo_dir), Objective({"ce": 1.0, "exact_match": 1.0}), device="cuda",
                       dtype="float32", batch_size=3)
    cpu = LocalBackend(Repository.open(local_repo_dir), Objective({"ce": 1.0, "exact_match": 1.0}), device="cpu",
                       batch_size=3)
    try:
        for recipe in (MIX, ZERO):
            a, b = gpu.evaluate(recipe, examples), cpu.evaluate(recipe, examples)
            assert a.ok and b.ok
            np.testing.assert_allclose(a.per_example["ce"], b.per_example["ce"], rtol=1e-4)
            assert a.metrics["exact_match"] == b.metrics["exact_match"]
    finally:
        gpu.close()
        cpu.close()
