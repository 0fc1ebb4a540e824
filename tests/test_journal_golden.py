"""A fixed-seed `evomerge search` journals exactly what it journaled before a refactor.

The golden file holds every evaluation of a python-backend search (asked points, recipes, losses,
metrics, in order) and the chosen result, as written by the code before issue 19's restructuring;
a change that alters which candidates are asked, or how they are scored or chosen, fails here.
Regenerate it only for a change meant to alter the search: `python tests/test_journal_golden.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.journal_identity import RUNS, journal_dump
from evomerge.cli import main

GOLDEN = Path(__file__).parent / "golden" / "python_search.json"
OLD_JOURNAL = Path(__file__).parent / "golden" / "python_search_v1.sqlite"
"""The same search's journal as the version before issue 19 wrote it (its fingerprint names the
evaluator by class only)."""


def _dump(tmp: Path) -> dict:
    journal = tmp / "python.sqlite"
    assert main(["search", *RUNS["python"], "--journal", str(journal), "--no-progress"]) == 0
    return json.loads(json.dumps(journal_dump(journal)))


def test_python_search_journal_matches_golden(tmp_path, capsys):
    dump = _dump(tmp_path)
    golden = json.loads(GOLDEN.read_text())
    assert len(dump["evaluations"]) == len(golden["evaluations"])
    for i, (got, want) in enumerate(zip(dump["evaluations"], golden["evaluations"])):
        assert got == want, f"evaluation {i} differs from the golden journal"
    assert dump == golden


def test_a_journal_of_the_earlier_version_resumes_and_still_refuses_another_search(tmp_path, capsys):
    import shutil

    journal = tmp_path / "old.sqlite"
    shutil.copy(OLD_JOURNAL, journal)
    flags = ["search", *RUNS["python"], "--journal", str(journal), "--no-progress", "--resume"]
    assert main([*flags, "--seed", "4"]) == 2
    assert "differs in: seed" in capsys.readouterr().err
    assert main(flags) == 0  # the same search: nothing is asked again
    assert journal_dump(journal)["evaluations"] == json.loads(GOLDEN.read_text())["evaluations"]


if __name__ == "__main__":
    import tempfile

    GOLDEN.write_text(json.dumps(_dump(Path(tempfile.mkdtemp())), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
