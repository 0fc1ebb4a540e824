"""Is a refactor behaviour-preserving? Run `evomerge search` with fixed seeds on each backend and
print a hash of what each journal holds (every evaluation and spend row, the result), less the
wall-clock columns (`seconds`, `created`), which no two runs share.

Run it before and after a change and compare the lines: equal hashes mean the same candidates
were asked in the same order and scored the same. The python backend's dump is also pinned by
tests/test_journal_golden.py; the local and api backends' depend on the tiny zoo this machine
built, so they are compared run against run, here.

    python -m benchmarks.journal_identity [--zoo DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

EVALUATION_COLUMNS = ("stage", "trial", "split", "z", "recipe", "recipe_key", "loss", "objective", "status",
                      "error", "metrics", "per_example", "queries", "tokens", "cached")

RUNS = {
    "python": ["--backend", "python", "--budget", "40", "--seed", "3"],
    "local": ["--backend", "local", "--budget", "14", "--seed", "1", "--test-table", "full"],
    "api": ["--backend", "api", "--budget", "12", "--seed", "2", "--max-queries", "400", "--test-table", "summary"],
}


def journal_dump(path: str | Path) -> dict[str, object]:
    """What a journal holds that a rerun must reproduce exactly: evaluations in order, spend rows,
    the chosen result and the test report (its seconds left out)."""
    with sqlite3.connect(str(path)) as db:
        rows = db.execute(f"SELECT {', '.join(EVALUATION_COLUMNS)} FROM evaluations ORDER BY seq").fetchall()
        spend = db.execute("SELECT stage, trial, split, queries, tokens FROM spend ORDER BY id").fetchall()
        meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('result', 'test_report')").fetchall())
    report = json.loads(meta.pop("test_report", "null"))
    if report is not None:
        report["cost"].pop("seconds")
    return {"evaluations": [list(r) for r in rows], "spend": [list(r) for r in spend], "meta": meta,
            "test_report": report}


def digest(dump: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, help="repository for the local and api runs (default: the tiny demo zoo)")
    parser.add_argument("--out", type=Path, help="keep the journals here")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="journal-identity-"))
    out.mkdir(parents=True, exist_ok=True)
    for name in args.runs:
        journal = out / f"{name}.sqlite"
        journal.unlink(missing_ok=True)
        flags = [*RUNS[name], "--journal", str(journal), "--no-progress"]
        if args.zoo is not None and name != "python":
            flags += ["--repository", str(args.zoo)]
        subprocess.run([sys.executable, "-m", "evomerge.cli", "search", *flags], check=True,
                       stdout=subprocess.DEVNULL)
        dump = journal_dump(journal)
        print(f"{name}: {digest(dump)} ({len(dump['evaluations'])} evaluations, {len(dump['spend'])} spend rows)",
              flush=True)


if __name__ == "__main__":
    main()
