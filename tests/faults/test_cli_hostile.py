"""Hostile input to the CLI: each mistake is one line on stderr and exit code 2, and a journal
it refuses stays untouched and resumable."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from evomerge.cli import main
from tests.helpers.crash import best_line, kill_during, paid, rows

ROOT = Path(__file__).resolve().parents[2]
GOOD_TASK = '{"prompt": "2+2=", "answer": "4"}\n{"prompt": "3+3=", "answer": "6"}\n'

pytestmark = pytest.mark.timeout(300)


def evomerge_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "evomerge", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=180)


def evomerge_main(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`evomerge ARGS` in this process (the same `main`, without a second's start-up per case)."""
    out, err = io.StringIO(), io.StringIO()
    here = Path.cwd()
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def one_line_exit_2(res: subprocess.CompletedProcess, words: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(lines) == 1 and lines[0].startswith("evomerge: error:") and words in lines[0], res.stderr


FILES = {
    "binary.yaml": b"\xff\xfe\x00\x81garbage",
    "tabs.yaml": b"\t- x: [\n",
    "seed.yaml": b"seed: 1.5\n",
    "experts.yaml": b"experts: 3\n",
    "workers.yaml": b"workers: -1\n",
    "validation.yaml": b"task:\n  validation: 1.5\n",
    "queries.yaml": b"max_queries: 0\n",
    "bad.jsonl": GOOD_TASK.encode() + b'{"prompt": "a" "answer": "b"}\n',
    "wrongtype.jsonl": b'{"prompt": "a", "answer": 3}\n',
    "good.jsonl": GOOD_TASK.encode(),
    "badline.yaml": b"backend: local\ntask:\n  files: [bad.jsonl]\n",
    "wrongtype.yaml": b"backend: local\ntask:\n  files: [wrongtype.jsonl]\n",
    "missingtask.yaml": b"backend: local\ntask:\n  files: [missing.jsonl]\n",
    "unknown.yaml": b"backend: local\nexperts: [math, nobody]\ntask:\n  files: [good.jsonl]\n",
}


@pytest.mark.parametrize("args, words", [
    (["--config", "binary.yaml"], "not a UTF-8 text file"),
    (["--config", "tabs.yaml"], "tabs.yaml:1: malformed YAML"),
    (["--config", "."], "cannot read config"),
    (["--config", "seed.yaml"], "seed"),
    (["--config", "experts.yaml"], "experts"),
    (["--config", "workers.yaml"], "workers"),
    (["--config", "validation.yaml"], "task.validation"),
    (["--config", "queries.yaml"], "max_queries"),
    (["--fitness", "missing.py:loss"], "cannot import fitness module"),
    (["--journal", "/proc/no/such/dir/run.sqlite"], "cannot create journal"),
    (["--backend", "local", "--repository", "no_such_repository"], "no_such_repository"),
    (["--config", "badline.yaml", "--repository", "{repo}"], "bad.jsonl:3:"),
    (["--config", "wrongtype.yaml", "--repository", "{repo}"], "wrongtype.jsonl:1:"),
    (["--config", "missingtask.yaml", "--repository", "{repo}"], "missing.jsonl"),
    (["--config", "unknown.yaml", "--repository", "{repo}"], "unknown expert(s) ['nobody']"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_bad_search_input_is_one_line_and_exit_2(tmp_path, tiny_repo, args, words) -> None:
    for name, content in FILES.items():
        (tmp_path / name).write_bytes(content)
    args = [a.replace("{repo}", str(tiny_repo)) for a in args]
    one_line_exit_2(evomerge_main("search", "--budget", "4", "--no-progress", *args, cwd=tmp_path), words)
    assert not (tmp_path / "run.sqlite").exists()


def journals(tmp_path: Path) -> dict[str, str]:
    """Broken or foreign journals, by the words the refusal must contain."""
    good = tmp_path / "good.sqlite"
    assert evomerge_main("search", "--budget", "30", "--journal", str(good), "--no-progress", cwd=tmp_path).returncode == 0
    data = good.read_bytes()
    (tmp_path / "truncated.sqlite").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.sqlite").write_bytes(b"\x00garbage" * 500)
    with sqlite3.connect(tmp_path / "foreign.sqlite") as conn:
        conn.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    newer = tmp_path / "newer.sqlite"
    newer.write_bytes(data)
    conn = sqlite3.connect(newer, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")  # all in the main file: its bytes are the whole journal
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    return {"truncated.sqlite": "not a readable evomerge journal", "garbage.sqlite": "not a readable evomerge journal",
            "foreign.sqlite": "not an evomerge journal", "newer.sqlite": "newer evomerge"}


def test_broken_and_foreign_journals_are_refused_by_every_command(tmp_path) -> None:
    for name, words in journals(tmp_path).items():
        before = (tmp_path / name).read_bytes()
        for args in (["search", "--budget", "30", "--journal", name, "--resume", "--no-progress"],
                     ["report", name, "--out", "report"], ["export", name, "--out", "export"]):
            one_line_exit_2(evomerge_main(*args, cwd=tmp_path), words)
        assert (tmp_path / name).read_bytes() == before, name


def content(path: Path) -> list[list[tuple]]:
    """Everything a journal holds (closing a killed run's journal may fold its WAL into the
    main file, which changes bytes but not content)."""
    with sqlite3.connect(path) as conn:
        return [conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
                for table in ("meta", "evaluations", "spend")]


def test_a_journal_of_another_configuration_is_refused_untouched_unless_forced(tmp_path) -> None:
    path = tmp_path / "run.sqlite"
    point = kill_during(path, 160, 5, "evaluation", 20)  # a crashed run, waiting to be resumed
    before, committed = content(path), rows(path)
    common = ["search", "--backend", "python", "--journal", str(path), "--resume", "--no-progress"]
    other = evomerge_cli(*common, "--budget", "160", "--seed", "6", cwd=tmp_path)
    one_line_exit_2(other, "different configuration (differs in: seed)")
    assert content(path) == before  # refused before anything was written
    bigger = evomerge_cli(*common, "--budget", "170", "--seed", "5", "--force", cwd=tmp_path)
    assert bigger.returncode == 0, bigger.stderr  # forced: the run goes on with the new budget
    assert rows(path)[: len(committed)] == committed and paid(path) == 170 > point.committed
    assert best_line(bigger.stdout)
