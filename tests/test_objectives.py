"""Objectives turn per-example metrics into one lower-is-better loss, per task first."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.objectives import SELECTION, Objective
from evomerge.score import Cost
from evomerge.tasks import Example

PER = {"ce": np.array([1.0, 3.0, 2.0, 4.0, 6.0]), "exact_match": np.array([1.0, 0.0, 1.0, 1.0, 0.0]),
       "f1": np.array([1.0, 0.5, 1.0, 1.0, 0.2]), "accuracy": np.array([1, 1, 0, 0, 1.0])}
TASKS = ["a", "a", "b", "b", "b"]


def test_tasks_are_averaged_not_pooled():
    assert Objective("ce").loss(PER, TASKS) == pytest.approx((2.0 + 4.0) / 2)
    assert Objective("exact_match").loss(PER, TASKS) == pytest.approx((0.5 + 1 / 3) / 2)
    assert Objective("accuracy", "worst").loss(PER, TASKS) == pytest.approx(2 / 3)


def test_blend_and_normalized():
    blend = Objective({"ce": 0.5, "f1": 2.0})
    per_task = blend.task_losses(PER, TASKS)
    assert per_task["a"] == pytest.approx(0.5 * 2.0 + 2.0 * 0.25)
    norm = Objective("ce", "normalized")
    assert norm.needs_references and not Objective("ce").needs_generation and blend.needs_generation
    with pytest.raises(ConfigError, match="reference"):
        norm.loss(PER, TASKS)
    assert norm.with_references({"a": 4.0, "b": 2.0}).loss(PER, TASKS) == pytest.approx((0.5 + 2.0) / 2)


@pytest.mark.parametrize("bad", [dict(metric="bleu"), dict(metric={}), dict(metric={"ce": -1}),
                                 dict(aggregate="median"), dict(references={"a": 0.0})])
def test_rejects_bad_objectives(bad):
    with pytest.raises(ConfigError):
        Objective(**bad)


def test_normalized_divides_each_metric_by_its_own_reference():
    """CE in nats and 1 − exact match in [0, 1] weigh alike once each is divided by the base's: half
    the answers turning right outweighs a few tenths of a nat, as the blend a user reads wants."""
    blend = Objective({"ce": 1.0, "exact_match": 1.0}, "normalized")
    base = {"ce": np.array([4.0, 4.0]), "exact_match": np.array([0.0, 0.0])}
    refs = blend.reference_losses(base, ["t", "t"])
    assert refs == {"t": {"ce": 4.0, "exact_match": 1.0}}
    fluent = {"ce": np.array([0.4, 0.5]), "exact_match": np.array([0.0, 0.0])}
    right = {"ce": np.array([1.0, 1.1]), "exact_match": np.array([1.0, 0.0])}
    scored = blend.with_references(refs)
    assert scored.loss(base, ["t", "t"]) == pytest.approx(1.0)  # the base is its own reference
    assert scored.loss(right, ["t", "t"]) == pytest.approx((1.05 / 4 + 0.5) / 2)
    assert scored.loss(fluent, ["t", "t"]) == pytest.approx((0.45 / 4 + 1.0) / 2)
    # (dividing the summed blend by the base's, (0.45 + 1) / 5 < (1.05 + 0.5) / 5, ranked the fluent, wrong merge first)
    perfect = blend.reference_losses({"ce": np.array([0.0, 0.2]), "exact_match": np.array([1.0, 1.0])}, ["t", "t"])
    assert perfect == {"t": {"ce": pytest.approx(0.1), "exact_match": 0.5}}  # 1 − EM floored at one example's worth
    with pytest.raises(ConfigError, match="exact_match"):
        Objective({"ce": 1.0, "exact_match": 1.0}, "normalized", {"t": {"ce": 1.0, "exact_match": 0.0}})


def test_the_stop_cross_entropy_is_a_loss_as_it_is():
    """`ce_stop` is nats like `ce` (not a rate to subtract from 1), floored like it as a reference."""
    per = {"ce_stop": np.array([0.5, 1.5, 0.0, 0.0])}
    assert Objective("ce_stop").loss(per, ["a", "a", "b", "b"]) == pytest.approx((1.0 + 0.0) / 2)
    assert Objective("ce_stop", "normalized").reference_losses(per, ["a", "a", "b", "b"]) == \
        {"a": {"ce_stop": 1.0}, "b": {"ce_stop": 1e-3}}


def test_a_blend_scores_its_rates_apart_for_the_choice():
    """A blend of CE and rates also records its loss on the rates alone (same aggregate and
    references), so selection can put right answers before fluency; a single metric has no such part."""
    blend = Objective({"ce": 0.25, "exact_match": 1.0, "f1": 0.5}, "normalized",
                      {"a": {"ce": 2.0, "exact_match": 1.0, "f1": 0.5}, "b": {"ce": 4.0, "exact_match": 0.5, "f1": 1.0}})
    assert blend.rates == Objective({"exact_match": 1.0, "f1": 0.5}, "normalized", blend.references)
    assert Objective("ce").rates is None and Objective("exact_match").rates is None
    examples = [Example(f"q{i}", "x", t, f"q{i}") for i, t in enumerate(TASKS)]
    score = blend.score(PER, examples, tuple(e.id for e in examples), Cost())
    em_a, em_b, f1_a, f1_b = 0.5, 1 / 3, 0.25, (0 + 0 + 0.8) / 3
    expected = ((em_a / 1.0 + 0.5 * f1_a / 0.5) / 1.5 + (em_b / 0.5 + 0.5 * f1_b / 1.0) / 1.5) / 2
    assert score.metrics[SELECTION] == pytest.approx(expected)
    assert score.metrics[SELECTION] != pytest.approx(score.loss)
    assert SELECTION not in Objective("exact_match").score(PER, examples, tuple(e.id for e in examples), Cost()).metrics
