"""`kill -9` a real `evomerge search` process at a chosen kind of moment, then resume it.

Kinds of kill point:
- ``evaluation``: while no write transaction is open (the process is mostly inside the slowed
  fitness function);
- ``commit``: inside an evaluation commit, held open by `tests.helpers.held_commit`.
(The journal holds no optimizer checkpoints any more: resume replays the evaluations.)

Where the process is gets probed from outside with SQLite's own lock: ``BEGIN IMMEDIATE`` with
no wait fails exactly while the search holds the journal's write transaction open. Shared by
tests/faults/test_crash.py and benchmarks/reliability.py.
"""

from __future__ import annotations

import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from evomerge.cli import main

ROOT = Path(__file__).resolve().parents[2]
FITNESS = f"{ROOT / 'tests' / '_fitness.py'}:slow_demo"
KINDS = ("evaluation", "commit")
EVAL_DELAY = "0.002"
"""Seconds per evaluation (EVOMERGE_TEST_DELAY of tests/_fitness.py): the run lasts seconds."""
_HOLD = {"commit": 0.05}
"""Seconds a kind's run holds each journal commit open (`tests.helpers.held_commit`)."""


def reference_args(journal: Path, budget: int, seed: int) -> list[str]:
    """`evomerge` arguments of a search on the demo fitness (slowed by EVOMERGE_TEST_DELAY, when set)."""
    return ["search", "--backend", "python", "--fitness", FITNESS, "--no-progress", "--budget", str(budget),
            "--seed", str(seed), "--journal", str(journal)]


def search(journal: Path, budget: int, seed: int, resume: bool = False, hold: float | None = None,
           ) -> subprocess.Popen:
    """Start `python -m evomerge search --backend python` on the slowed demo fitness; with `hold`,
    through `tests.helpers.held_commit`, each journal commit held open `hold` seconds."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), EVOMERGE_TEST_DELAY=EVAL_DELAY)
    cli = ["evomerge"] if hold is None else ["tests.helpers.held_commit", str(hold)]
    args = [sys.executable, "-m", *cli, *reference_args(journal, budget, seed)]
    return subprocess.Popen(args + (["--resume"] if resume else []), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def paid(path: Path) -> int:
    """Paid fit evaluations committed so far (0 while the file is not yet a journal)."""
    try:
        with sqlite3.connect(path, timeout=0.5) as conn:
            return conn.execute("SELECT COUNT(*) FROM evaluations WHERE split='fit' AND cached=0").fetchone()[0]
    except sqlite3.Error:
        return 0


def writing(path: Path) -> bool:
    """True while another process holds the journal's write transaction open."""
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        conn.close()


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def rows(path: Path) -> list[tuple]:
    """Every journaled evaluation: what must survive a crash unchanged."""
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT seq, stage, trial, split, z, loss, status, cached FROM evaluations ORDER BY seq"
                            ).fetchall()


def best_line(out: str) -> str:
    """The printed best recipe: its header line and its table of coefficients."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("best recipe:"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return "\n".join(lines[start:end])


@dataclass(frozen=True)
class KillPoint:
    kind: str
    committed: int
    """Paid evaluations committed when the process died."""


def kill_during(journal: Path, budget: int, seed: int, kind: str, after: int, resume: bool = False,
                timeout: float = 120.0) -> KillPoint:
    """Run a search, and SIGKILL it at the first moment of `kind` once `after` evaluations are paid."""
    proc = search(journal, budget, seed, resume=resume, hold=_HOLD.get(kind))
    deadline = time.monotonic() + timeout
    try:
        while paid(journal) < after:
            _alive(proc, deadline, kind, after)
            time.sleep(0.002)
        while not _at(journal, kind):
            _alive(proc, deadline, kind, after)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    return KillPoint(kind, paid(journal))


def _at(journal: Path, kind: str) -> bool:
    if kind == "evaluation":
        return not writing(journal)
    if not writing(journal):
        time.sleep(0.001)
        return False
    return True


def _alive(proc: subprocess.Popen, deadline: float, kind: str, after: int) -> None:
    if proc.poll() is not None:
        raise AssertionError(f"the search ended (rc {proc.returncode}) before a {kind} kill point after {after}")
    if time.monotonic() > deadline:
        raise AssertionError(f"no {kind} kill point after {after} evaluations in time")


def random_points(n: int, budget: int, seed: int) -> list[tuple[str, int]]:
    """`n` (kind, after) kill points cycling through the kinds, `after` drawn at random."""
    rng = random.Random(seed)
    return [(KINDS[i % len(KINDS)], rng.randint(1, budget - 5)) for i in range(n)]


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run: its best recipe line and every evaluation (less the commit order)."""

    best: str
    evaluations: list[tuple]


def reference_run(path: Path, budget: int, seed: int) -> Reference:
    """The uninterrupted run, in this process (the CLI's own code path; a subprocess costs seconds)."""
    out = io.StringIO()
    old = os.environ.get("EVOMERGE_TEST_DELAY")
    os.environ["EVOMERGE_TEST_DELAY"] = EVAL_DELAY
    try:
        with redirect_stdout(out):
            code = main(reference_args(path, budget, seed))
    finally:
        if old is None:
            del os.environ["EVOMERGE_TEST_DELAY"]
        else:
            os.environ["EVOMERGE_TEST_DELAY"] = old
    if code != 0:
        raise AssertionError(f"the reference run failed with exit code {code}")
    return Reference(best_line(out.getvalue()), sorted(r[1:] for r in rows(path)))


@dataclass(frozen=True)
class Resumed:
    """What `--resume` of a killed journal did, against the uninterrupted reference."""

    integrity_before: str
    integrity_after: str
    returncode: int
    stderr: str
    kept: bool
    """Every evaluation committed before the kill is still there, unchanged."""
    paid: int
    duplicates: int
    """(stage, trial, split) keys journaled more than once."""
    same_evaluations: bool
    same_best: bool

    def ok(self, budget: int) -> bool:
        return (self.integrity_before == self.integrity_after == "ok" and self.returncode == 0 and self.kept
                and self.paid == budget and self.duplicates == 0 and self.same_evaluations and self.same_best)


def resume(path: Path, budget: int, seed: int, ref: Reference) -> Resumed:
    """Resume a killed run to the end and compare it with `ref`."""
    before_check = integrity(path)
    before = rows(path)
    proc = search(path, budget, seed, resume=True)
    out, err = proc.communicate(timeout=300)
    after = rows(path)
    best = best_line(out) if "best recipe:" in out else None
    return Resumed(before_check, integrity(path), proc.returncode, err, after[: len(before)] == before, paid(path),
                   len(after) - len({r[1:4] for r in after}), sorted(r[1:] for r in after) == ref.evaluations,
                   best == ref.best)
