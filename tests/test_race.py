"""Racing: minibatch first, finish only the promising; deterministic and cheaper."""

import numpy as np
import pytest

import evomerge
from evomerge.errors import ConfigError
from evomerge.scheduler.race import Race
from evomerge.score import STATUS_STOPPED, Score
from evomerge.search_spaces import ClassicSpace
from evomerge.tasks import Example, Splits

TARGETS = np.linspace(0.2, 0.6, 40)


class Regression:
    """Per-example loss (w − target_i)²: a minibatch estimates the full loss with noise.
    `scored` counts every example the evaluator was asked to score."""

    def __init__(self):
        self.scored = []

    splits = Splits(tuple(Example(str(t), "", id=f"f{i}") for i, t in enumerate(TARGETS)),
                    tuple(Example(str(t), "", id=f"v{i}") for i, t in enumerate(TARGETS[::4])), ())

    def __call__(self):
        def evaluate(recipe, split):
            examples = self.splits.get(split)
            self.scored.append(len(examples))
            values = tuple((recipe.weights[0] - float(e.prompt)) ** 2 for e in examples)
            return Score(float(np.mean(values)), per_example={"loss": values}, example_ids=tuple(e.id for e in examples))
        return evaluate


def run(race, workers=1, seed=0):
    space = ClassicSpace("task_arithmetic", ["a"], weights=1.2, sigma0=0.3)
    evaluator = Regression()
    result = evomerge.search(space=space, evaluator=evaluator, budget=80, seed=seed, race=race, workers=workers, top_k=1)
    return result, sum(evaluator.scored)


def test_racing_stops_weak_candidates_and_scores_fewer_examples():
    full, full_cost = run(None)
    raced, raced_cost = run(Race(fraction=0.25, quantile=0.5, warmup=8))
    stopped = [t for t in raced.trials if t.score.status == STATUS_STOPPED]
    assert len(stopped) >= 10
    assert all(len(t.score.example_ids) == 10 for t in stopped)  # a quarter of 40 fit examples
    assert raced_cost < 0.9 * full_cost
    assert raced.best.ok and raced.best_loss < 0.05
    assert sum(s.evaluations for s in raced.stages) == 80


def test_racing_is_deterministic_across_worker_counts():
    a = evomerge.search(space=ClassicSpace("task_arithmetic", ["a"], weights=1.2, sigma0=0.3), evaluator=Regression(),
                        budget=60, seed=1, race=Race(warmup=8), lookahead=12)
    b = evomerge.search(space=ClassicSpace("task_arithmetic", ["a"], weights=1.2, sigma0=0.3), evaluator=Regression(),
                        budget=60, seed=1, race=Race(warmup=8), lookahead=12, workers=4)
    assert [(t.z, t.score.status, t.loss) for t in a.trials] == [(t.z, t.score.status, t.loss) for t in b.trials]


def test_racing_needs_examples():
    with pytest.raises(ConfigError, match="racing needs"):
        evomerge.search(lambda r: 1.0, ClassicSpace("task_arithmetic", ["a"]), budget=5, race=Race())
    with pytest.raises(ConfigError, match="fraction"):
        Race(fraction=1.5)


def test_a_minibatch_spans_every_task():
    from evomerge.tasks import split_search

    examples = [Example(f"{t}{i}", "x", task=t, id=f"{t}{i}") for t in "abc" for i in range(12)]
    fit, val = split_search(examples, 0.25, seed=3)
    minibatch = Splits(fit, val, ()).get("fit:6")
    assert sorted(e.task for e in minibatch) == ["a", "a", "b", "b", "c", "c"]
    assert len(val) == 9 and not set(fit) & set(val)


def test_a_later_stage_races_from_its_first_candidate():
    """The bar carries over between stages (same fit set, same objective): the strength sweep's
    results are the warmup of the joint stage after it, which pays no fresh warmup in full."""
    from evomerge.search_spaces import build_space

    evaluator = Regression()
    result = evomerge.search(space=build_space("evo_joint", ["a"]), evaluator=evaluator, budget=20, seed=0,
                             race=Race(fraction=0.1, warmup=3), top_k=1)
    sweep = [t for t in result.trials if t.stage == 0 and not t.cached]
    assert len(sweep) == 3  # β = 0.5, 1 and the capped 2, 4, 8 → 1.5
    # the sweep in full, its best validated (10 examples), then the joint stage's first paid
    # candidate on a minibatch (4 of the 40 fit examples)
    assert evaluator.scored[:5] == [40, 40, 40, 10, 4]
