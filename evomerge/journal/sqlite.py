"""The journal: every evaluation and spend reservation of a run, in one SQLite file.

Only the scheduler writes it (one writer, append-only rows); a result is committed before it
counts toward the budget, so a crash or `kill -9` loses at most evaluations in flight, which a
resumed run asks again identically. WAL mode with synchronous=NORMAL survives a killed process
(not a power cut) at ~0.1 ms a commit. It holds data only: resume replays the journaled
evaluations into a freshly seeded optimizer (an earlier version's pickled optimizer checkpoints
are never read, so a journal from someone else cannot run code). A paid evaluation's spend is
reserved in its own table before it is sent and closed when its result is recorded
(`evomerge.scheduler.ledger`).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from evomerge.errors import JournalError
from evomerge.journal.records import Trial, dumps
from evomerge.recipe import MergeRecipe
from evomerge.score import Cost, Score

SCHEMA_VERSION = 1
_MAGIC = "evomerge-journal"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evaluations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    stage INTEGER NOT NULL,
    trial INTEGER NOT NULL,
    split TEXT NOT NULL,
    z TEXT NOT NULL,
    recipe TEXT NOT NULL,
    recipe_key TEXT NOT NULL,
    loss REAL,
    objective REAL,
    status TEXT NOT NULL,
    error TEXT,
    metrics TEXT NOT NULL,
    per_example TEXT NOT NULL,
    queries INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    seconds REAL NOT NULL,
    cached INTEGER NOT NULL,
    created REAL NOT NULL,
    UNIQUE (stage, trial, split)
);
CREATE INDEX IF NOT EXISTS evaluations_key ON evaluations (recipe_key, split);
CREATE TABLE IF NOT EXISTS spend (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stage INTEGER NOT NULL,
    trial INTEGER NOT NULL,
    split TEXT NOT NULL,
    queries INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    created REAL NOT NULL
);
"""


class Journal:
    """An open journal file. `create` starts a run, `open` resumes or reads one."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._batch = 0

    @classmethod
    def create(cls, path: str | Path, fingerprint: dict[str, Any], config: dict[str, Any] | None = None) -> Journal:
        path = Path(path)
        if path.exists() and path.stat().st_size > 0:
            raise JournalError(f"journal {path} already exists; pass --resume to continue it or choose a new path")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = cls._connect(path)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot create journal {path} ({exc}); choose a writable path") from None
        with conn:
            conn.executescript(_SCHEMA)
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("magic", _MAGIC), ("schema_version", str(SCHEMA_VERSION)),
                ("fingerprint", json.dumps(fingerprint, sort_keys=True)),
                ("config", json.dumps(config or {}, sort_keys=True)), ("created", repr(time.time()))])
        return cls(path, conn)

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict[str, Any] | None = None, force: bool = False) -> Journal:
        """Open an existing journal; with `fingerprint`, refuse one written by a different run."""
        path = Path(path)
        if not path.is_file():
            raise JournalError(f"journal {path} does not exist; check the path or start a run without --resume")
        try:
            conn = sqlite3.connect(str(path), check_same_thread=False)  # WAL only once it is ours: a
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())  # foreign file stays as it is
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{path} is not a readable evomerge journal ({exc}); "
                               "point at the .sqlite file a search wrote") from None
        refusal = None
        if meta.get("magic") != _MAGIC:
            refusal = f"{path} is an SQLite file but not an evomerge journal"
        elif int(meta.get("schema_version", "0")) > SCHEMA_VERSION:
            refusal = f"{path} was written by a newer evomerge (schema {meta['schema_version']}); upgrade evomerge"
        elif fingerprint is not None and not force:
            stored = json.loads(meta["fingerprint"])
            theirs = json.loads(json.dumps(fingerprint, sort_keys=True))
            if "version" not in stored:  # an earlier version's: the evaluator by class name only
                theirs = {k: v for k, v in theirs.items() if k in stored and k != "evaluator"}
                stored.pop("evaluator", None)
            if stored != theirs:
                diff = sorted(k for k in set(stored) | set(theirs) if stored.get(k) != theirs.get(k))
                refusal = (f"journal {path} belongs to a different configuration (differs in: {', '.join(diff)}); "
                           "use the original settings, a new journal path, or --force")
        if refusal is not None:
            conn.close()
            raise JournalError(refusal)
        conn = cls._configure(conn)
        with conn:  # a journal of an earlier version gains the tables it lacks (none holds rows yet)
            conn.executescript(_SCHEMA)
        return cls(path, conn)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        return Journal._configure(sqlite3.connect(str(path), check_same_thread=False))

    @staticmethod
    def _configure(conn: sqlite3.Connection) -> sqlite3.Connection:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Commit every `record` inside the block in one transaction (results that arrived
        together); none of them counts before the block ends."""
        self._batch += 1
        try:
            yield
        except BaseException:
            self._batch -= 1
            if not self._batch:
                self._conn.rollback()
            raise
        self._batch -= 1
        if not self._batch:
            self._conn.commit()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata ---------------------------------------------------------------------------
    def meta(self, key: str) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0]) if key in ("fingerprint", "config") else row[0]

    def set_meta(self, key: str, value: Any) -> None:
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    # -- evaluations ------------------------------------------------------------------------
    def record(self, stage: int, trial: int, split: str, z: Any, recipe: MergeRecipe, score: Score,
               objective: float, cached: bool, reservation: int | None = None) -> Trial:
        """Commit one evaluation; it counts only once this returns. Its spend `reservation`, if
        any, is closed in the same transaction: from then on the row's own cost is its spend."""
        created = time.time()
        loss = score.loss if math.isfinite(score.loss) else None
        obj = objective if math.isfinite(objective) else None
        zl = [float(v) for v in z]
        with self.batch():
            cur = self._conn.execute(
                "INSERT INTO evaluations (stage, trial, split, z, recipe, recipe_key, loss, objective, status, error,"
                " metrics, per_example, queries, tokens, seconds, cached, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (stage, trial, split, dumps(zl), recipe.to_json(), recipe.key(), loss, obj, score.status, score.error,
                 dumps(_finite(score.metrics)), dumps({k: list(v) for k, v in score.per_example.items()} | (
                     {"_ids": list(score.example_ids)} if score.example_ids else {})),
                 score.cost.queries, score.cost.tokens, score.cost.seconds, int(cached), created))
            if reservation is not None:
                self._conn.execute("DELETE FROM spend WHERE id = ?", (reservation,))
        return Trial(_inserted(cur), stage, trial, split, tuple(zl), recipe, score, objective, cached, created)

    def trials(self, stage: int | None = None, split: str | None = None) -> list[Trial]:
        """Journaled evaluations in commit order, optionally of one stage and split."""
        sql = "SELECT * FROM evaluations"
        args: list[Any] = []
        where = []
        if stage is not None:
            where.append("stage = ?")
            args.append(stage)
        if split is not None:
            where.append("split = ?")
            args.append(split)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [_trial(row) for row in self._rows(sql + " ORDER BY seq", args)]

    def _rows(self, sql: str, args: list[Any]) -> Iterator[dict[str, Any]]:
        cur = self._conn.execute(sql, args)
        names = [d[0] for d in cur.description]
        for row in cur:
            yield dict(zip(names, row, strict=True))

    def totals(self) -> Cost:
        q, t, s = self._conn.execute(
            "SELECT COALESCE(SUM(queries),0), COALESCE(SUM(tokens),0), COALESCE(SUM(seconds),0)"
            " FROM evaluations WHERE cached = 0").fetchone()
        return Cost(int(q), int(t), float(s))

    # -- spend reservations (evomerge.scheduler.ledger) ------------------------------------------
    def reserve(self, stage: int, trial: int, split: str, cost: Cost) -> int:
        """Commit a reservation of `cost` for an evaluation about to be sent, and return its id.
        It commits at once, with whatever an open `batch` holds so far: a reservation must be
        durable before its first request leaves, so a `kill -9` cannot forget the spend."""
        cur = self._conn.execute("INSERT INTO spend (stage, trial, split, queries, tokens, created)"
                                 " VALUES (?, ?, ?, ?, ?, ?)",
                                 (stage, trial, split, cost.queries, cost.tokens, time.time()))
        self._conn.commit()
        return _inserted(cur)

    def outstanding(self) -> Cost:
        """Reservations never closed by a recorded evaluation (a run killed while they were in
        flight): what they may have spent, counted at their whole reservation."""
        q, t = self._conn.execute("SELECT COALESCE(SUM(queries),0), COALESCE(SUM(tokens),0) FROM spend").fetchone()
        return Cost(int(q), int(t))

    def count(self, split: str = "fit", paid_only: bool = True) -> int:
        sql = "SELECT COUNT(*) FROM evaluations WHERE split = ?" + (" AND cached = 0" if paid_only else "")
        return int(self._conn.execute(sql, (split,)).fetchone()[0])


def _finite(metrics: Any) -> dict[str, Any]:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in dict(metrics).items()}


def _inserted(cur: sqlite3.Cursor) -> int:
    """The id of the row `cur` just inserted (sqlite3 types `lastrowid` None for a cursor that inserted none)."""
    assert cur.lastrowid is not None
    return cur.lastrowid


def _trial(row: dict[str, Any]) -> Trial:
    per_example = orjson.loads(row["per_example"])
    ids = tuple(per_example.pop("_ids", ()))
    score = Score(loss=math.nan if row["loss"] is None else row["loss"], metrics=orjson.loads(row["metrics"]),
                  cost=Cost(row["queries"], row["tokens"], row["seconds"]), status=row["status"], error=row["error"],
                  per_example={k: tuple(v) for k, v in per_example.items()}, example_ids=ids)
    recipe = MergeRecipe.from_dict(orjson.loads(row["recipe"]))
    recipe.__dict__["_json"], recipe.__dict__["_key"] = row["recipe"], row["recipe_key"]
    return Trial(row["seq"], row["stage"], row["trial"], row["split"], tuple(orjson.loads(row["z"])), recipe, score,
                 math.nan if row["objective"] is None else row["objective"], bool(row["cached"]), row["created"])
