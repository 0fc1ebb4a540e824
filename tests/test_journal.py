import sqlite3

import pytest

from evomerge.errors import JournalError
from evomerge.journal import Journal
from evomerge.recipe import MergeRecipe
from evomerge.score import Cost, Score


def recipe(w: float) -> MergeRecipe:
    return MergeRecipe("evo", ("a", "b"), (w, -w), (1.0, 0.5))


def test_records_round_trip_in_commit_order(tmp_path):
    path = tmp_path / "j.sqlite"
    with Journal.create(path, {"run": 1}) as j:
        j.record(0, 0, "fit", [0.1, 0.2], recipe(0.1), Score(1.5, {"acc": 0.5}, Cost(3, 40, 0.2),
                 per_example={"ce": (1.0, 2.0)}, example_ids=("x", "y")), 1.6, cached=False)
        j.record(0, 1, "fit", [0.3, 0.4], recipe(0.3), Score.failed("boom", Cost(1, 0, 0.1)), float("nan"), cached=False)
        j.record(0, 2, "fit", [0.1, 0.2], recipe(0.1), Score(1.5), 1.6, cached=True)
        closed = j.reserve(0, 3, "fit", Cost(5, 500))
        j.reserve(0, 4, "fit", Cost(2, 200))  # in flight when the run died
        j.record(0, 3, "fit", [0.5, 0.5], recipe(0.5), Score(1.0, cost=Cost(1, 90)), 1.0, cached=False,
                 reservation=closed)
    with Journal.open(path, {"run": 1}) as j:
        trials = j.trials()
        assert [t.trial for t in trials] == [0, 1, 2, 3]
        first, failed, cached, _ = trials
        assert first.recipe == recipe(0.1) and first.z == (0.1, 0.2)
        assert first.score.per_example == {"ce": (1.0, 2.0)} and first.score.example_ids == ("x", "y")
        assert first.score.metrics == {"acc": 0.5} and first.objective == 1.6
        assert not failed.ok and failed.score.error == "boom"
        assert cached.cached
        assert j.totals() == Cost(5, 130, pytest.approx(0.3))  # cached trials cost nothing
        assert j.count("fit") == 3
        assert j.outstanding() == Cost(2, 200)  # a recorded result closes its reservation; the other stays


def test_same_trial_cannot_be_committed_twice(tmp_path):
    with Journal.create(tmp_path / "j.sqlite", {}) as j:
        j.record(0, 0, "fit", [0.0], recipe(0.0), Score(1.0), 1.0, cached=False)
        with pytest.raises(sqlite3.IntegrityError):
            j.record(0, 0, "fit", [0.0], recipe(0.0), Score(1.0), 1.0, cached=False)


def test_refuses_foreign_corrupt_and_mismatched_journals(tmp_path):
    path = tmp_path / "j.sqlite"
    Journal.create(path, {"seed": 1}).close()
    with pytest.raises(JournalError, match="different configuration.*seed"):
        Journal.open(path, {"seed": 2})
    Journal.open(path, {"seed": 2}, force=True).close()
    with pytest.raises(JournalError, match="already exists"):
        Journal.create(path, {"seed": 1})
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError, match="not a readable evomerge journal"):
        Journal.open(junk)
    foreign = tmp_path / "foreign.sqlite"
    sqlite3.connect(foreign).execute("CREATE TABLE meta (key TEXT, value TEXT)").connection.commit()
    with pytest.raises(JournalError, match="not an evomerge journal"):
        Journal.open(foreign)
    with pytest.raises(JournalError, match="does not exist"):
        Journal.open(tmp_path / "missing.sqlite")
