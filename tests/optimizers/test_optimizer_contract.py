"""Every registered optimizer: seeded asks, ask-ahead, replayed resume, never-asked tells, bounds."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.optimizers import OPTIMIZERS, Optimizer, make_optimizer
from evomerge.search_spaces import EvoSpace

NAMES = sorted(OPTIMIZERS)
SPACE = EvoSpace(("a", "b", "c", "d"), "joint")
TARGET = np.array([0.3, 0.9, 0.6, 1.0, 0.8, -0.6, 0.1, 0.0])


def loss(z: np.ndarray) -> float:
    return float(np.sum((z - TARGET) ** 2))


def drive(opt: Optimizer, rounds: int, ahead: int) -> list[np.ndarray]:
    """Ask `ahead` candidates, tell them all, repeat; return every asked point."""
    asked = []
    for _ in range(rounds):
        batch = [opt.ask() for _ in range(ahead)]
        asked += batch
        for z in batch:
            opt.tell(z, loss(z))
    return asked


def test_registry_holds_the_promised_names():
    assert {"cma", "random", "ngopt", "ng-cma", "twopointsde", "pso", "oneplusone"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_asks_even_asking_ahead(name):
    runs = []
    for global_seed in (1, 2):
        np.random.seed(global_seed)  # the optimizer must not depend on numpy's global generator
        opt = make_optimizer(name, SPACE, seed=11, popsize=6)
        runs.append(drive(opt, rounds=4, ahead=12))
    assert len(runs[0]) == 48
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    if name != "grid":  # a fixed sweep has no randomness to seed
        other = drive(make_optimizer(name, SPACE, seed=12, popsize=6), rounds=1, ahead=12)
        assert any(not np.array_equal(a, b) for a, b in zip(runs[0], other))
    assert all(np.all((SPACE.lower <= z) & (z <= SPACE.upper)) for z in runs[0])


@pytest.mark.parametrize("name", NAMES)
def test_a_rebuilt_optimizer_replaying_the_history_continues_identically(name):
    """Resume's path (scheduler/loop.py): a freshly seeded optimizer asked and told the journaled
    trials again, in their order, asks the same next points as the one that wrote them."""
    opt = make_optimizer(name, SPACE, seed=3, popsize=6)
    history = drive(opt, rounds=3, ahead=5)
    in_flight = [opt.ask() for _ in range(8)]
    twin = make_optimizer(name, SPACE, seed=3, popsize=6)
    replayed = drive(twin, rounds=3, ahead=5) + [twin.ask() for _ in range(8)]
    for a, b in zip(history + in_flight, replayed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert (twin.n_asked, twin.n_told, twin.best_loss) == (opt.n_asked, opt.n_told, opt.best_loss)
    sequences = []
    for o in (opt, twin):
        np.random.rand(3)
        for z in reversed(in_flight):  # results come back out of order
            o.tell(z, loss(z))
        sequences.append(drive(o, rounds=4, ahead=4))
    for a, b in zip(*sequences):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(opt.recommend(), twin.recommend())


@pytest.mark.parametrize("name", NAMES)
def test_telling_never_asked_points_replays_a_journal(name):
    opt = make_optimizer(name, SPACE, seed=5, popsize=6)
    rng = np.random.default_rng(0)
    journal = [rng.uniform(SPACE.lower, SPACE.upper) for _ in range(20)]
    journal.append(SPACE.upper + 1.0)  # a point outside the box is clipped, not refused
    for z in journal:
        opt.tell(z, loss(z))
    assert (opt.n_told, opt.n_asked) == (21, 0)
    best = min(journal, key=loss)
    np.testing.assert_array_equal(opt.best_z, best)
    nxt = drive(opt, rounds=2, ahead=6)
    assert all(np.all((SPACE.lower <= z) & (z <= SPACE.upper)) for z in nxt)


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_loss_is_refused(name):
    opt = make_optimizer(name, SPACE, seed=0)
    z = opt.ask()
    with pytest.raises(ValueError, match="finite"):
        opt.tell(z, float("nan"))


def test_make_optimizer_names_the_choices():
    with pytest.raises(ConfigError, match="cma.*ngopt.*random"):
        make_optimizer("simulated-annealing", SPACE, seed=0)
    with pytest.raises(ConfigError, match="nevergrad has no optimizer"):
        make_optimizer("ng:NoSuchThing", SPACE, seed=0)
    with pytest.raises(ConfigError, match="invalid options"):
        make_optimizer("random", SPACE, seed=0, momentum=0.9)
    # the budget is a hint: every optimizer takes it, and it reaches those that plan by it
    assert make_optimizer("random", SPACE, seed=0, budget=10).name
    assert make_optimizer("ngopt", SPACE, seed=0, budget=37).ng.budget == 37
    assert make_optimizer("CMA", SPACE, seed=0).popsize == 4 + int(3 * np.log(SPACE.dim))
    assert make_optimizer("ng:DiscreteLenglerOnePlusOne", SPACE, seed=0).name == "ng:DiscreteLenglerOnePlusOne"


def test_grid_sweeps_its_points_in_order_then_repeats():
    points = [SPACE.lower, SPACE.x0, SPACE.upper]
    opt = make_optimizer("grid", SPACE, seed=0, points=[p.tolist() for p in points])
    asked = drive(opt, rounds=2, ahead=3)
    for got, want in zip(asked, points * 2):
        np.testing.assert_array_equal(got, want)
    assert opt.best_loss == min(loss(p) for p in points)
    with pytest.raises(ConfigError, match="dimension"):
        make_optimizer("grid", SPACE, seed=0, points=[[0.5]])
