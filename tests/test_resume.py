"""kill -9 a real search process mid-run, resume it, and compare with an uninterrupted run."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.journal import Journal
from tests.helpers.crash import best_line

ROOT = Path(__file__).resolve().parents[1]
FITNESS = f"{ROOT / 'tests' / '_fitness.py'}:slow_demo"


def cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), EVOMERGE_TEST_DELAY="0.005")
    return subprocess.Popen([sys.executable, "-m", "evomerge", "search", "--backend", "python", "--fitness", FITNESS,
                             "--no-progress", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def paid(path: Path) -> int:
    try:
        with sqlite3.connect(path) as conn:
            return conn.execute("SELECT COUNT(*) FROM evaluations WHERE split='fit' AND cached=0").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("kill_at", [7, 53, 131])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, kill_at):
    budget = 160
    ref = cli("--budget", str(budget), "--seed", "5", "--journal", str(tmp_path / "ref.sqlite"))
    ref_out, ref_err = ref.communicate(timeout=120)
    assert ref.returncode == 0, ref_err

    path = tmp_path / "run.sqlite"
    proc = cli("--budget", str(budget), "--seed", "5", "--journal", str(path))
    deadline = time.time() + 60
    while paid(path) < kill_at and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < paid(path) < budget, "the kill must land mid-run"

    resumed = cli("--budget", str(budget), "--seed", "5", "--journal", str(path), "--resume")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert best_line(out) == best_line(ref_out)
    with Journal.open(path) as j, Journal.open(tmp_path / "ref.sqlite") as r:
        assert j.count("fit") == budget
        mine = [(t.stage, t.trial, t.z, t.loss) for t in j.trials(split="fit")]
        theirs = [(t.stage, t.trial, t.z, t.loss) for t in r.trials(split="fit")]
    assert sorted(mine) == sorted(theirs)  # nothing lost, nothing paid twice, same candidates


def test_resume_refuses_another_configuration(tmp_path):
    path = tmp_path / "run.sqlite"
    first = cli("--budget", "20", "--seed", "1", "--journal", str(path))
    assert first.wait(timeout=60) == 0
    other = cli("--budget", "20", "--seed", "2", "--journal", str(path), "--resume")
    _, err = other.communicate(timeout=60)
    assert other.returncode == 2
    assert err.strip().count("\n") == 0 and "different configuration" in err and "seed" in err


class _Payload:
    """Unpickling this runs code: it writes `path` (what a journal from someone else could do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pwned"))


def test_a_malicious_checkpoint_pickle_runs_nothing_and_resume_replays_the_evaluations(tmp_path):
    """An earlier version stored pickled optimizers in a `checkpoints` table; a journal carrying a
    hostile pickle there resumes from its journaled evaluations and executes nothing."""
    import pickle

    import evomerge
    from evomerge.demo import demo_fitness
    from evomerge.search_spaces import build_space

    space = build_space("linear", ["a", "b", "c"])
    reference = evomerge.search(demo_fitness, space, budget=40, seed=3, journal=tmp_path / "ref.sqlite")
    path, marker = tmp_path / "run.sqlite", tmp_path / "executed"
    evomerge.search(demo_fitness, space, budget=40, seed=3, journal=path)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM evaluations WHERE seq > 25")  # a run killed after 25 evaluations
        conn.execute("CREATE TABLE checkpoints (stage INTEGER, n_told INTEGER, version INTEGER, state BLOB,"
                     " created REAL, PRIMARY KEY (stage, n_told))")
        for version in (1, 2):
            conn.execute("INSERT INTO checkpoints VALUES (0, ?, ?, ?, 0)",
                         (10 * version, version, pickle.dumps(_Payload(marker))))
    resumed = evomerge.search(demo_fitness, space, budget=40, seed=3, journal=path, resume=True)
    assert not marker.exists()
    assert resumed.history == reference.history and resumed.best_recipe == reference.best_recipe
