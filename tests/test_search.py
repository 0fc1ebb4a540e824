"""The search loop end to end with the python backend: budget, determinism, cache, failures,
validation selection, caps and the journal it leaves."""

import math
import threading
from dataclasses import replace

import numpy as np

import pytest

import evomerge
from evomerge.demo import EXPERTS, demo_fitness
from evomerge.errors import ConfigError, EvomergeError
from evomerge.journal import Journal
from evomerge.objectives import Objective
from evomerge.scheduler.selection import choose
from evomerge.score import Cost, Score
from evomerge.search_spaces import build_space
from evomerge.tasks import Example


def space(name="evo", **options):
    return build_space(name, list(EXPERTS), **options)


def test_exact_budget_and_journal(tmp_path):
    path = tmp_path / "run.sqlite"
    result = evomerge.search(demo_fitness, space(), budget=60, seed=1, journal=path)
    assert sum(s.evaluations for s in result.stages) == 60
    assert [s.name for s in result.stages] == ["alpha", "beta"]
    with Journal.open(path) as j:
        assert j.count("fit") == 60
        rows = j.trials(split="fit")
    assert [t.trial for t in rows if t.stage == 0] == list(range(len([t for t in rows if t.stage == 0])))
    assert min(t.loss for t in rows) == result.best_loss
    assert result.best_recipe.method == "evo"


def test_same_seed_same_candidates_and_result():
    runs = [evomerge.search(demo_fitness, space("evo_joint"), budget=80, seed=7) for _ in range(2)]
    assert [t.z for t in runs[0].trials] == [t.z for t in runs[1].trials]
    other = evomerge.search(demo_fitness, space("evo_joint"), budget=80, seed=8)
    assert [t.z for t in other.trials] != [t.z for t in runs[0].trials]


def test_threads_give_the_same_result_as_one_worker():
    one = evomerge.search(demo_fitness, space("evo_joint"), budget=60, seed=3, lookahead=16)
    four = evomerge.search(demo_fitness, space("evo_joint"), budget=60, seed=3, lookahead=16, workers=4)
    assert [t.z for t in one.trials] == [t.z for t in four.trials]
    assert one.best_recipe == four.best_recipe


def test_search_improves_on_the_start():
    result = evomerge.search(demo_fitness, space("evo_joint"), budget=400, seed=0)
    start = demo_fitness(space("evo_joint").space(0, None).decode(space("evo_joint").space(0, None).x0))["loss"]
    assert result.best_loss < start * 0.5


def test_the_start_is_trial_zero_and_wins_when_nothing_beats_it():
    sp = space("evo_joint", scale_grid=None, singles=False).space(0, None)
    start = sp.decode(sp.x0)

    def loss(recipe):  # the start is the optimum: every other candidate is worse
        return sum((a - b) ** 2 for a, b in zip(recipe.weights + recipe.densities, start.weights + start.densities))

    result = evomerge.search(loss, sp, budget=20, seed=0)
    assert result.trials[0].recipe == start and result.best_recipe == start and result.best_loss == 0.0
    blind = evomerge.search(loss, sp, budget=20, seed=0, start=False)
    assert blind.trials[0].recipe != start and blind.best_loss > 0.0
    two_stage = evomerge.search(loss, space("evo"), budget=20, seed=0)
    stage2 = [t for t in two_stage.trials if t.stage == 1]
    assert stage2[0].cached and stage2[0].recipe == two_stage.stages[0].best.recipe  # stage 2 starts at stage 1's best, free


def test_failures_are_recorded_and_the_search_goes_on(tmp_path):
    calls = []

    def flaky(recipe):
        calls.append(1)
        if len(calls) % 3 == 0:
            raise ValueError("boom")
        if len(calls) % 5 == 0:
            return float("nan")
        return demo_fitness(recipe)["loss"]

    result = evomerge.search(flaky, space("evo_joint"), budget=40, seed=2, journal=tmp_path / "j.sqlite")
    failed = [t for t in result.trials if not t.ok]
    assert len(failed) >= 10
    assert any("ValueError: boom" in (t.score.error or "") for t in failed)
    assert any("nan" in (t.score.error or "") for t in failed)
    assert math.isfinite(result.best_loss)
    assert sum(s.evaluations for s in result.stages) == 40


def test_every_failure_is_a_clear_error():
    with pytest.raises(EvomergeError, match="every candidate failed.*ZeroDivisionError"):
        evomerge.search(lambda r: 1 / 0, space("evo_joint"), budget=5)


def test_identical_recipes_are_served_from_the_journal(tmp_path):
    """A fitness whose space rounds to a grid: most asks repeat a recipe, and only new ones are paid."""
    from evomerge.search_spaces._base import SearchSpace
    import numpy as np

    class Grid(SearchSpace):
        name = "grid"

        def __init__(self):
            self.lower, self.upper, self.x0 = np.zeros(1), np.ones(1), np.full(1, 0.5)

        def _decode(self, z):
            return evomerge.MergeRecipe("task_arithmetic", ("a",), (round(float(z[0]) * 4) / 4,))

        def encode(self, recipe):
            return np.array(recipe.weights)

    paid = []
    result = evomerge.search(lambda r: paid.append(r.key()) or (r.weights[0] - 0.25) ** 2, Grid(), budget=5,
                             optimizer="random", seed=0, journal=tmp_path / "g.sqlite")
    assert len(paid) == len(set(paid)) == 5
    cached = [t for t in result.trials if t.cached]
    assert cached, "a 5-point grid must repeat recipes"
    with Journal.open(tmp_path / "g.sqlite") as j:
        assert j.count("fit") == 5 and j.count("fit", paid_only=False) == len(result.trials)
    assert result.best_recipe.weights == (0.25,)


class SplitEvaluator:
    """An evaluator factory with a validation split whose optimum differs from fit's."""

    has_validation = True  # as a backend's factory with non-empty `splits.validation` says

    def __call__(self):
        def evaluate(recipe, split):
            w = recipe.weights[0]
            target = 0.2 if split == "fit" else 0.4
            return Score((w - target) ** 2 + (0.0 if split == "fit" else 0.01), cost=Cost(queries=2, tokens=10))
        return evaluate


def test_validation_chooses_among_the_top_candidates(tmp_path):
    from evomerge.search_spaces import ClassicSpace

    result = evomerge.search(space=ClassicSpace("task_arithmetic", ["a"], weights=0.3, sigma0=0.3),
                             evaluator=SplitEvaluator(), budget=40,
                             seed=0, top_k=40, journal=tmp_path / "v.sqlite")
    fit_best = min((t for t in result.trials if t.ok), key=lambda t: t.loss)
    assert result.validation is not None
    assert abs(result.best_recipe.weights[0] - 0.4) < abs(fit_best.recipe.weights[0] - 0.4)
    with Journal.open(tmp_path / "v.sqlite") as j:
        assert len(j.trials(split="validation")) >= 2


class FluentOrRight:
    """Validation scored by a blend of CE and exact match: weight 0.3 gives the lowest CE and no
    right answer, weights in [0.6, 1] half the answers right at a higher CE and a worse blend."""

    has_validation = True

    def __call__(self):
        objective = Objective({"ce": 1.0, "exact_match": 1.0})
        examples = [Example("p", "a", "t", "0"), Example("p", "a", "t", "1")]

        def evaluate(recipe, split):
            w = recipe.weights[0]
            ce = 0.1 + 3 * abs(w - 0.3)
            right = [1.0, 0.0] if 0.6 <= w <= 1.0 else [0.0, 0.0]
            per = {"ce": np.array([ce, ce]), "exact_match": np.array(right)}
            return objective.score(per, examples, ("0", "1"), Cost(queries=1))
        return evaluate


def test_validation_puts_right_answers_before_a_lower_blended_loss():
    """Among the finalists, more right answers on validation win over a merge of lower CE (the tiny
    zoo's regression: 0.05 exact match returned over 0.20 by CE), then the blended loss decides."""
    from evomerge.search_spaces import ClassicSpace

    result = evomerge.search(space=ClassicSpace("task_arithmetic", ["a"], weights=(0.3,), sigma0=0.3),
                             evaluator=FluentOrRight(), budget=30, seed=0, top_k=30, optimizer="random")
    fit = [t for t in result.trials if t.ok and t.split == "fit"]
    assert min(fit, key=lambda t: t.loss).recipe.weights == (0.3,)  # the start: the blend ranks it first
    right = [t.recipe.weights[0] for t in fit if 0.6 <= t.recipe.weights[0] <= 1.0]
    assert right, "the random search must sample a weight that answers right"
    assert result.best_recipe.weights[0] == min(right)  # right answers first, then the lower blend
    assert result.validation.score.metrics["exact_match"] == 0.5
    by_val = {(t.stage, t.trial): replace(t, score=replace(t.score, metrics={})) for t in fit}
    old, _ = choose(fit, by_val)  # a journal from before the rates were recorded: the blend alone
    assert old.recipe.weights == (0.3,)


def test_the_best_single_expert_is_chosen_by_the_same_rule():
    """The test table's best single expert is the one with more right answers on validation, not
    the more fluent one, and the rates' loss is not shown as a test metric."""
    from evomerge.baselines import compare_on_test

    objective = Objective({"ce": 1.0, "exact_match": 1.0})
    examples = [Example("p", "a", "t", "0"), Example("p", "a", "t", "1")]
    per_expert = {"fluent": ([0.1, 0.1], [0.0, 0.0]), "right": ([2.0, 2.0], [1.0, 0.0])}

    def score(items, split):
        out = {}
        for k, recipe in items:
            ce, em = per_expert.get(recipe.experts[0], ([1.0, 1.0], [0.0, 0.0]))
            per = {"ce": np.array(ce), "exact_match": np.array(em)}
            out[k] = objective.score(per, examples, ("0", "1"), Cost())
        return out

    assert score([(0, evomerge.MergeRecipe("task_arithmetic", ("fluent",), (1.0,)))], "validation")[0].loss < \
        score([(0, evomerge.MergeRecipe("task_arithmetic", ("right",), (1.0,)))], "validation")[0].loss
    report = compare_on_test(score, evomerge.MergeRecipe("task_arithmetic", ("fluent",), (1.0,)),
                             ["fluent", "right"], "validation")
    assert report.best_single == "right" and report.rows["best_single"]["exact_match"] == 0.5
    assert "loss_rates" not in report.rows["best"] and "exact_match" in report.rows["best"]


def test_query_cap_is_never_exceeded():
    from evomerge.search_spaces import ClassicSpace

    result = evomerge.search(space=ClassicSpace("task_arithmetic", ["a"]), evaluator=SplitEvaluator(), budget=100,
                             seed=0, max_queries=21, workers=4)
    assert result.cost.queries <= 21
    assert result.cost.queries >= 18  # the cap stops the search, not something else


def test_bad_arguments_are_clear():
    with pytest.raises(ConfigError, match="budget"):
        evomerge.search(demo_fitness, space(), budget=0)
    with pytest.raises(ConfigError, match="unknown optimizer"):
        evomerge.search(demo_fitness, space(), budget=5, optimizer="adamw")
    with pytest.raises(ConfigError, match="exactly one"):
        evomerge.search(None, space(), budget=5)


def test_workers_really_overlap():
    active, peak, lock = [0], [0], threading.Lock()

    def slow(recipe):
        import time

        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        with lock:
            active[0] -= 1
        return demo_fitness(recipe)

    evomerge.search(slow, space("evo_joint"), budget=24, workers=4, seed=0)
    assert peak[0] == 4


def test_the_strength_sweep_spends_the_budget_exactly_even_when_its_points_coincide():
    sweep_then_joint = space("evo_joint", singles=False)
    single = build_space("evo_joint", ["only"], singles=False)  # β = 2, 4, 8 cap at 1.5: 3 points, not 5

    def loss(recipe):
        return sum((w - 0.3) ** 2 for w in recipe.weights) + sum((1 - d) ** 2 for d in recipe.densities)

    for plan, budget in ((sweep_then_joint, 12), (single, 8)):
        result = evomerge.search(loss, plan, budget=budget, seed=0)
        paid = [t for t in result.trials if not t.cached]
        assert len(paid) == budget
        assert [s.name for s in result.stages] == ["scale", "joint"]
        sweep = [t for t in paid if t.stage == 0]
        assert len({t.recipe.weights[0] for t in sweep}) == len(sweep) == plan.budgets(budget)[0]


def test_the_window_is_sized_by_the_stage_the_optimizer_runs(tmp_path):
    """The strength sweep (stage 0) is a fixed 1-D grid; the joint CMA stage after it sets the
    default lookahead, as a search of that stage alone would."""
    from evomerge.optimizers import make_optimizer

    plan = space("evo_joint", singles=False)
    sweep = plan.space(0, None)
    popsize = make_optimizer("cma", plan.space(1, sweep.decode(sweep.x0)), seed=0).popsize
    assert popsize > make_optimizer("cma", sweep, seed=0).popsize
    path = tmp_path / "run.sqlite"
    evomerge.search(demo_fitness, plan, budget=60, seed=0, journal=path)
    with Journal.open(path) as j:
        assert j.meta("fingerprint")["lookahead"] == popsize
    with_starts = space("evo_joint")  # the singles and pairs stages are fixed grids too
    evomerge.search(demo_fitness, with_starts, budget=60, seed=0, journal=tmp_path / "starts.sqlite")
    with Journal.open(tmp_path / "starts.sqlite") as j:
        assert j.meta("fingerprint")["lookahead"] == popsize
