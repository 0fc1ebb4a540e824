"""`python -m tests.helpers.held_commit SECONDS ARGS...`: evomerge's CLI with every explicit journal
commit held SECONDS inside its open write transaction (rows written, COMMIT not yet sent), so a
`kill -9` can land there (tests/helpers/crash.py's ``commit`` kill point).

The hook lives here, not in the journal: this process alone connects to SQLite through a
`sqlite3.Connection` whose `commit` sleeps first; production code reads no test setting.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from functools import partial


def hold_commits(seconds: float) -> None:
    """Make every later `sqlite3.connect` in this process hold its commits `seconds` first."""

    class Held(sqlite3.Connection):
        def commit(self) -> None:
            if self.in_transaction:
                time.sleep(seconds)
            super().commit()

    sqlite3.connect = partial(sqlite3.connect, factory=Held)  # type: ignore[assignment]


if __name__ == "__main__":
    hold_commits(float(sys.argv[1]))
    from evomerge.cli import main

    sys.exit(main(sys.argv[2:]))
