"""Evo-Merging's plan: exact budgets, stage 2 built on stage 1's best, the variants by name."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from evomerge.errors import ConfigError, SearchSpaceError
from evomerge.blocks import blocks_for
from evomerge.recipe import MergeRecipe
from evomerge.search_spaces import EvoPlan, build_space
from evomerge.search_spaces.evo import carried_for

EXPERTS = ("a", "b", "c", "d")


@given(total=st.integers(2, 100_000), fraction=st.floats(0.01, 0.99))
def test_two_stage_budgets_sum_exactly(total, fraction):
    budgets = EvoPlan(EXPERTS, alpha_fraction=fraction).budgets(total)
    assert sum(budgets) == total
    assert len(budgets) == 2 and min(budgets) >= 1


def test_paper_budget_split():
    plan = build_space("evo", EXPERTS)
    assert plan.names == ("alpha", "beta")
    assert plan.budgets(1200) == [400, 800]
    with pytest.raises(ConfigError, match="at least 2"):
        plan.budgets(1)


@pytest.mark.parametrize("schedule", ["alpha", "beta", "joint"])
def test_single_stage_schedules_take_the_whole_budget(schedule):
    plan = build_space("evo", EXPERTS, schedule=schedule)
    assert plan.budgets(37) == [37]
    space = plan.space(0, None)
    assert space.dim == (8 if schedule == "joint" else 4)


def test_stage_one_searches_alpha_from_one_with_beta_one_over_n():
    space = build_space("evo", EXPERTS).space(0, None)
    np.testing.assert_array_equal(space.x0, np.ones(4))
    assert space.sigma0 == 0.05
    recipe = space.decode([0.1, 0.2, 0.3, 0.4])
    assert recipe.method == "evo"
    assert recipe.densities == (0.1, 0.2, 0.3, 0.4)
    assert recipe.weights == (0.25,) * 4
    assert space.penalty(np.array([0.1, 0.2, 0.3, 0.4])) == pytest.approx(0.05 * 0.25)


def test_stage_two_fixes_alpha_at_stage_one_best():
    plan = build_space("evo", EXPERTS, method="evo_tv", penalty=0.1)
    best = plan.space(0, None).decode([0.9, 0.1, 0.5, 0.7])
    beta = plan.space(1, best)
    assert beta.dim == 4
    np.testing.assert_allclose(beta.x0, 0.25)
    recipe = beta.decode([1.2, -0.3, 0.0, 1.5])
    assert recipe.densities == best.densities == (0.9, 0.1, 0.5, 0.7)
    assert recipe.weights == (1.2, -0.3, 0.0, 1.5)
    assert recipe.method == "evo_tv"
    assert beta.penalty(np.array([1.2, -0.3, 0.0, 1.5])) == pytest.approx(0.1 * 3.0 / 4)
    with pytest.raises(ConfigError, match="stage 'alpha'"):
        plan.space(1, None)


def test_beta_init_one_and_the_joint_plan():
    plan = build_space("evo", EXPERTS, beta_init="1")
    assert plan.space(0, None).decode(np.ones(4)).weights == (1.0,) * 4
    joint = build_space("evo_joint", EXPERTS, scale_grid=None, singles=False)
    assert joint.names == ("joint",)
    space = joint.space(0, None)
    np.testing.assert_allclose(space.x0, [1, 1, 1, 1, 0.25, 0.25, 0.25, 0.25])
    np.testing.assert_array_equal(space.lower, [0] * 4 + [-1.5] * 4)
    np.testing.assert_array_equal(space.upper, [1] * 4 + [1.5] * 4)
    with pytest.raises(ConfigError, match="beta_init"):
        build_space("evo", EXPERTS, beta_init="half")


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="schedule"):
        build_space("evo", EXPERTS, schedule="three_stage")
    with pytest.raises(ConfigError, match="unknown search space 'evo2'"):
        build_space("evo2", EXPERTS)
    with pytest.raises(ConfigError, match="invalid options"):
        build_space("evo", EXPERTS, colour="red")
    with pytest.raises(ConfigError, match="alpha has 3 values"):
        build_space("evo", EXPERTS, alpha_init=[1, 1, 1])


def test_evo_joint_sweeps_the_uniform_merges_strength_first():
    plan = build_space("evo_joint", EXPERTS, singles=False)
    assert plan.names == ("scale", "joint")
    assert plan.budgets(40) == [5, 35] and plan.budgets(3) == [2, 1]
    sweep = plan.space(0, None)
    assert sweep.optimizer == ("grid", {"points": [[0.125], [0.25], [0.5], [1.0], [1.5]]})  # 8/4 capped at 1.5
    uniform = sweep.decode(sweep.x0)
    assert uniform.weights == (0.25,) * 4 and uniform.densities == (1.0,) * 4 and uniform.scale == 1.0
    best = sweep.decode([1.0])
    assert best.weights == (1.0,) * 4 and sweep.encode(best) == pytest.approx([1.0])
    joint = plan.space(1, best)
    assert joint.decode(joint.x0) == best  # the joint search starts at the sweep's best, served from the cache
    with pytest.raises(SearchSpaceError, match="shared"):
        sweep.encode(joint.decode(np.r_[np.full(4, 0.5), np.full(4, 1.0)]))
    two = build_space("evo", EXPERTS, scale_grid=(0.5, 2.0, 1.0))  # and every expert at full strength
    assert two.names == ("scale", "alpha", "beta") and two.budgets(34) == [4, 10, 20]
    assert two.space(0, None).optimizer[1]["points"] == [[0.125], [0.5], [0.25], [1.0]]
    six = build_space("evo_joint", [f"e{i}" for i in range(6)], singles=False).space(0, None)
    assert six.optimizer[1]["points"] == [[0.5 / 6], [1 / 6], [2 / 6], [4 / 6], [8 / 6], [1.0]]
    with pytest.raises(ConfigError, match="scale_grid"):
        build_space("evo_joint", EXPERTS, scale_grid=(2.0, 4.0))
    alone = build_space("evo_joint", ["only"], singles=False)  # β = 2, 4, 8 all cap at 1.5: three distinct points
    assert alone.space(0, None).optimizer[1]["points"] == [[0.5], [1.0], [1.5]] and alone.budgets(10) == [3, 7]


def test_evo_joint_sees_each_expert_alone_then_the_pairs_with_the_best():
    plan = build_space("evo_joint", EXPERTS)
    assert plan.names == ("scale", "singles", "pairs", "joint")
    assert plan.budgets(500) == [5, 4, 3, 488]  # each start once: the sweep, N singles, N - 1 pairs
    assert plan.budgets(16) == [5, 2, 1, 8] and plan.budgets(4) == [1, 1, 1, 1]  # starts take at most half
    with pytest.raises(ConfigError, match="at least 4"):
        plan.budgets(3)
    many = build_space("evo_joint", [f"e{i}" for i in range(128)])
    assert many.budgets(500) == [6, 128, 116, 250]  # the sweep's 5 multiples of 1/128 and β = 1
    uniform = plan.space(0, None).decode([0.5])
    singles = plan.space(1, uniform)
    points = singles.optimizer[1]["points"]
    assert points[0] == [0.5] * 4 and points[1:] == np.eye(4).tolist()  # the sweep's best first: served from the cache
    alone = singles.decode(points[3])
    assert alone.weights == (0.0, 0.0, 1.0, 0.0) and alone.densities == (1.0,) * 4 and singles.encode(alone).tolist() == points[3]
    pairs = plan.space(2, alone).optimizer[1]["points"]
    assert pairs == [[0, 0, 1, 0], [1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    joint = plan.space(3, singles.decode(pairs[1]))
    assert joint.decode(joint.x0).weights == (1.0, 0.0, 1.0, 0.0)
    with pytest.raises(ConfigError, match="pairs"):
        plan.space(2, None)
    assert build_space("evo_joint", ["only"]).names == ("scale", "singles", "joint")


def test_the_starts_find_a_merge_two_experts_carry():
    """The optimum is two experts at full strength: far from the uniform merge for a local search
    stepping by σ0 = 0.05, one pair away for the starts."""
    import evomerge

    names = [f"e{i}" for i in range(8)]
    target = np.array([0, 0, 0, 1.0, 0, 0, 1.0, 0])

    def loss(recipe):
        return float(np.sum((np.array(recipe.weights) - target) ** 2))

    found = evomerge.search(loss, build_space("evo_joint", names), budget=60, seed=0)
    local = evomerge.search(loss, build_space("evo_joint", names, singles=False), budget=60, seed=0)
    assert found.best_loss < 0.05 < 1.0 < local.best_loss


def test_every_stage_of_an_evo_ties_plan_merges_with_ties_sign_election():
    plan = build_space("evo_joint", EXPERTS, method="evo_ties")
    best = plan.space(0, None).decode([1.0])
    assert best.method == "evo_ties" and best.weights == (1.0,) * 4  # the sweep: TIES at strength λ = 1
    alone = plan.space(1, best).decode([0.0, 1.0, 0.0, 0.0])
    joint = plan.space(3, plan.space(2, alone).decode([1.0, 1.0, 0.0, 0.0]))
    moved = joint.decode(joint.x0 + 0.1)
    assert moved.method == "evo_ties" and moved.densities == (1.0,) * 4 and moved.weights == pytest.approx((1.1, 1.1, 0.1, 0.1))
    with pytest.raises(ConfigError, match="evo_ties"):
        build_space("evo_joint", EXPERTS, method="ties")


def test_the_block_stage_refines_the_found_merge_per_layer_group_and_kind():
    plan = build_space("evo_joint", EXPERTS, refine_groups=2, num_layers=4)
    assert plan.names == ("scale", "singles", "pairs", "joint", "blocks")
    assert plan.budgets(100) == [5, 4, 3, 66, 22] and sum(plan.budgets(9)) == 9
    assert plan.budgets(4) == [1, 1, 1, 1, 0] and plan.budgets(70) == [5, 4, 3, 58, 0]  # a small budget leaves it out
    found = MergeRecipe("evo_tv", tuple(EXPERTS), (1.0, 0.0, -0.5, 0.75), (1.0, 0.5, 1.0, 1.0))
    stage = plan.space(4, found)
    assert stage.dim == 4 and stage.decode(stage.x0) == found  # its start is the found merge, cached
    # CMA-ES's default population in 4 dimensions is 8: a stage of fewer than 4 generations samples uniformly
    assert plan.space(4, found, 31).optimizer == ("random", {}) and plan.space(4, found, 32).optimizer is None
    assert stage.optimizer is None  # (the budget not known: the run's optimizer)
    assert stage.upper.tolist() == [1.5] * 4  # 1.5 · 1.0 reaches β's bound
    refined = stage.decode([0.5, 1.0, 1.5, 0.0])
    by_block = {b.name: b for b in refined.blocks}
    assert set(by_block) == {"layers.0-2.attn", "layers.0-2.mlp", "layers.2-4.attn", "layers.2-4.mlp"}
    assert by_block["layers.0-2.attn"].weights == (0.5, 0.0, -0.25, 0.375)
    assert by_block["layers.2-4.mlp"].weights == (0.0,) * 4 and by_block["layers.0-2.mlp"].densities == found.densities
    assert refined.weights == found.weights and stage.encode(refined).tolist() == [0.5, 1.0, 1.5, 0.0]
    with pytest.raises(ConfigError, match="num_layers"):
        build_space("evo_joint", EXPERTS, refine_groups=2)
    # the default wherever the model's layers are known; refine_groups=0 leaves it out
    assert build_space("evo_joint", EXPERTS, num_layers=30).blocks == blocks_for(30, 2)
    assert build_space("evo_joint", EXPERTS, num_layers=30, refine_groups=0).names[-1] == "joint"
    assert build_space("evo", EXPERTS, num_layers=30).names == ("alpha", "beta")  # the paper's plan as written


def test_the_block_stage_gives_the_experts_that_carry_the_merge_their_own_multipliers_where_its_budget_affords_them():
    assert [carried_for(4, 4, b) for b in (19, 20, 39, 40, 59, 60, 79, 80, 500)] == [0, 0, 0, 1, 1, 2, 2, 4, 4]
    plan = build_space("evo_joint", EXPERTS, refine_groups=2, num_layers=4, block_experts=True)
    found = MergeRecipe("evo_tv", tuple(EXPERTS), (1.0, 0.0, -0.5, 0.75), (1.0, 0.5, 1.0, 1.0))
    assert plan.space(4, found, 22).dim == 4  # one shared multiplier per block, as without a budget
    two = plan.space(4, found, 60)  # the two largest |β| on their own, the others sharing one
    assert two.dim == 12 and two.describe()["carried"] == 2 and two.decode(two.x0) == found
    assert two.upper.tolist() == [2.0, 1.5, 2.0] * 4  # each multiplier stops where its largest β would leave the bounds
    refined = two.decode([0.5, 1.0, 1.5] + [1.0] * 9)
    assert refined.blocks[0].weights == (1.0, 0.0, -0.25, 1.125) and refined.blocks[1].weights == found.weights
    every = plan.space(4, found, 500)
    assert every.dim == 12 and every.describe()["carried"] == 3  # β = 0 gets no multiplier: it would scale nothing
    assert build_space("evo_joint", EXPERTS, refine_groups=2, num_layers=4).space(4, found, 500).dim == 4  # the default


def test_a_search_with_the_block_stage_finds_a_per_block_strength_a_global_one_cannot():
    import evomerge

    names = [f"e{i}" for i in range(4)]
    want = {"layers.0-1.attn": 1.0, "layers.0-1.mlp": 0.2, "layers.1-2.attn": 0.6, "layers.1-2.mlp": 1.4}

    def loss(recipe):
        weights = {b.name: b.weights[1] for b in recipe.blocks} or dict.fromkeys(want, recipe.weights[1])
        others = sum(abs(w) for i, w in enumerate(recipe.weights) if i != 1)
        return sum((weights[k] - v) ** 2 for k, v in want.items()) + others

    flat = evomerge.search(loss, build_space("evo_joint", names), budget=80, seed=0)
    fine = evomerge.search(loss, build_space("evo_joint", names, refine_groups=2, num_layers=2), budget=80, seed=0)
    floor = 0.8  # one weight for every block: at best w = 0.8, Σ (w - v)² = 0.8
    assert flat.best_loss >= floor - 1e-9 > fine.best_loss


def test_a_small_block_stage_samples_the_box_and_reaches_a_block_turned_off():
    """17 block evaluations are two generations of CMA-ES, whose samples stay within σ0 = 0.2 of the
    found merge's multiplier 1; sampled uniformly, a multiplier near 0 (a block's update off) is found."""
    import evomerge

    names = [f"e{i}" for i in range(4)]

    def loss(recipe):
        weights = {b.name: b.weights[1] for b in recipe.blocks} or {"layers.0-1.attn": recipe.weights[1]}
        others = sum(abs(w) for i, w in enumerate(recipe.weights) if i != 1)
        return (1.0 - recipe.weights[1]) ** 2 + others + (weights["layers.0-1.attn"] > 0.25)

    plan = build_space("evo_joint", names, refine_groups=2, num_layers=2)
    result = evomerge.search(loss, plan, budget=80, seed=0)
    assert result.stages[-1].name == "blocks" and result.stages[-1].evaluations == 17
    assert result.best.stage == 4 and result.best_loss < 1.0


def test_a_block_stage_with_experts_of_their_own_finds_per_expert_strengths_a_shared_one_cannot():
    import evomerge

    names = [f"e{i}" for i in range(4)]
    want = {"layers.0-1.attn": (1.0, 0.2), "layers.0-1.mlp": (0.2, 1.0), "layers.1-2.attn": (0.6, 1.4),
            "layers.1-2.mlp": (1.4, 0.6)}

    def loss(recipe):
        got = {b.name: b.weights[1:3] for b in recipe.blocks} or dict.fromkeys(want, recipe.weights[1:3])
        others = abs(recipe.weights[0]) + abs(recipe.weights[3])
        return sum((g - v) ** 2 for k, pair in want.items() for g, v in zip(got[k], pair)) + others

    def search(**options):
        plan = build_space("evo_joint", names, refine_groups=2, num_layers=2, **options)
        return evomerge.search(loss, plan, budget=300, seed=0)

    shared, own = search(), search(block_experts=True)
    # one multiplier per block scales (β1, β2) along a line: at best the smallest eigenvalue of Σ t·tᵀ
    floor = 1.28
    assert shared.best_loss >= floor - 1e-9 > own.best_loss
    assert own.stages[-1].evaluations == 72 and own.best.stage == 4


def test_a_budget_too_small_for_the_block_stage_runs_without_it():
    import evomerge

    result = evomerge.search(lambda r: float(sum(w * w for w in r.weights)),
                             build_space("evo_joint", EXPERTS, num_layers=4), budget=4, seed=0)
    assert [s.name for s in result.stages] == ["scale", "singles", "pairs", "joint"]
    assert sum(s.evaluations for s in result.stages) == 4
