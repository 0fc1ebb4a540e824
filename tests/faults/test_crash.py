"""`kill -9` during an evaluation and a journal commit, then `--resume`:
no corruption, nothing lost or paid twice, and the uninterrupted run's result."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.crash import Reference, integrity, kill_during, random_points, reference_run, resume, rows

SEED = 5
BUDGET = 160
SLOW_BUDGET = 300
SLOW_POINTS = 24

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    return reference_run(tmp_path_factory.mktemp("crash") / "reference.sqlite", BUDGET, SEED)


@pytest.fixture(scope="module")
def slow_reference(tmp_path_factory) -> Reference:
    return reference_run(tmp_path_factory.mktemp("crash_slow") / "reference.sqlite", SLOW_BUDGET, SEED)


def resume_and_check(path: Path, budget: int, ref: Reference) -> None:
    """The killed journal is sound; resuming it finishes the run the uninterrupted one did."""
    done = resume(path, budget, SEED, ref)
    assert done.returncode == 0, done.stderr
    assert done.integrity_before == done.integrity_after == "ok"
    assert done.kept  # every committed evaluation kept, unchanged
    assert done.paid == budget and done.duplicates == 0  # nothing lost, nothing paid twice
    assert done.same_evaluations  # the same candidates, losses, failures as the uninterrupted run
    assert done.same_best
    assert done.ok(budget)


def test_sigkill_in_an_evaluation_and_commits_then_resume(tmp_path, reference) -> None:
    """One run killed three times (the later kills hit resumed runs), then resumed to the end."""
    path = tmp_path / "run.sqlite"
    committed, again = 0, False
    for kind, after in (("evaluation", 37), ("commit", 91), ("commit", 120)):
        before = rows(path) if again else []
        point = kill_during(path, BUDGET, SEED, kind, max(after, committed + 1), resume=again)
        assert committed < point.committed < BUDGET, kind
        assert integrity(path) == "ok" and rows(path)[: len(before)] == before
        committed, again = point.committed, True
    resume_and_check(path, BUDGET, reference)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(SLOW_POINTS))
def test_sigkill_at_random_points_then_resume(tmp_path, slow_reference, index) -> None:
    kind, after = random_points(SLOW_POINTS, SLOW_BUDGET, 2026)[index]
    path = tmp_path / "run.sqlite"
    point = kill_during(path, SLOW_BUDGET, SEED, kind, after)
    assert point.committed >= after
    resume_and_check(path, SLOW_BUDGET, slow_reference)
