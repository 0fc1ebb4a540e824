"""`kill -9` during an evaluation, a journal commit and an optimizer checkpoint, then `--resume`:
no corruption, nothing lost or paid twice, and the uninterrupted run's result."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from evomerge.cli import main

from tests.faults.crash import (best_line, reference_args, integrity, kill_during, last_checkpoint, paid, random_points, rows,
                                search)

SEED = 5
BUDGET = 160
SLOW_BUDGET = 300
SLOW_POINTS = 24

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Reference:
    best: str
    evaluations: list[tuple]
    last_checkpoint: int


def reference_run(path: Path, budget: int) -> Reference:
    """The uninterrupted run, in this process (the CLI's own code path; a subprocess costs seconds)."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(reference_args(path, budget, SEED)) == 0
    return Reference(best_line(out.getvalue()), sorted(r[1:] for r in rows(path)), last_checkpoint(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    return reference_run(tmp_path_factory.mktemp("crash") / "reference.sqlite", BUDGET)


@pytest.fixture(scope="module")
def slow_reference(tmp_path_factory) -> Reference:
    return reference_run(tmp_path_factory.mktemp("crash_slow") / "reference.sqlite", SLOW_BUDGET)


def resume_and_check(path: Path, budget: int, ref: Reference) -> None:
    """The killed journal is sound; resuming it finishes the run the uninterrupted one did."""
    assert integrity(path) == "ok"
    before = rows(path)
    proc = search(path, budget, SEED, resume=True)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    after = rows(path)
    assert after[: len(before)] == before  # every committed evaluation kept, unchanged
    assert integrity(path) == "ok"
    assert paid(path) == budget
    assert len({r[1:4] for r in after}) == len(after)  # each (stage, trial, split) exactly once
    assert sorted(r[1:] for r in after) == ref.evaluations  # the same candidates, losses, failures
    assert best_line(out) == ref.best


def test_sigkill_in_an_evaluation_a_commit_and_a_checkpoint_then_resume(tmp_path, reference) -> None:
    """One run killed three times (the later kills hit resumed runs), then resumed to the end."""
    path = tmp_path / "run.sqlite"
    committed, resume = 0, False
    for kind, after in (("evaluation", 37), ("commit", 91), ("checkpoint", 120)):
        before = rows(path) if resume else []
        point = kill_during(path, BUDGET, SEED, kind, max(after, committed + 1), resume=resume)
        assert committed < point.committed < BUDGET, kind
        assert integrity(path) == "ok" and rows(path)[: len(before)] == before
        committed, resume = point.committed, True
    resume_and_check(path, BUDGET, reference)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(SLOW_POINTS))
def test_sigkill_at_random_points_then_resume(tmp_path, slow_reference, index) -> None:
    kind, after = random_points(SLOW_POINTS, SLOW_BUDGET, 2026, slow_reference.last_checkpoint)[index]
    path = tmp_path / "run.sqlite"
    point = kill_during(path, SLOW_BUDGET, SEED, kind, after)
    assert point.committed >= after
    resume_and_check(path, SLOW_BUDGET, slow_reference)
