"""The API key of a search never lands in its journal, logs, output, report or exports."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evomerge
from evomerge.backends.remote import ApiEvaluatorFactory
from evomerge.search_spaces import build_space
from evomerge.tasks import Splits
from tests.helpers.api_search import EXAMPLES
from tests.helpers.provider import API_KEY

ROOT = Path(__file__).resolve().parents[2]
KEY_ENV = "EVOMERGE_SECRETS_TEST_KEY"
WRONG_KEY = "sk-wrong-" + API_KEY[-12:][::-1]

pytestmark = pytest.mark.timeout(300)


def evomerge_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "evomerge", *args], capture_output=True, text=True, env=env,
                          timeout=180)


def files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.parametrize("key", [API_KEY, WRONG_KEY], ids=["right-key", "wrong-key"])
def test_the_key_is_nowhere_in_what_a_search_leaves(server, tmp_path, monkeypatch, caplog, capfd, key) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, key)
    journal = tmp_path / "run.sqlite"
    factory = ApiEvaluatorFactory(server.base_url, KEY_ENV, Splits(EXAMPLES, (), ()),
                                  options=(("batch_size", 4), ("retries", 0)))
    space = build_space("evo_joint", ["math", "colour", "french"])
    try:
        result = evomerge.search(space=space, evaluator=factory, budget=6, journal=journal, progress=True)
        assert key == API_KEY and result.best.ok
    except evomerge.errors.EvomergeError as exc:  # a wrong key: every candidate fails, and says why
        assert key == WRONG_KEY and "401" in str(exc) and key not in str(exc)
    if key == WRONG_KEY:
        return _check(tmp_path, key, caplog.text, *capfd.readouterr())
    report = evomerge_cli("report", str(journal), "--out", str(tmp_path / "report"))
    export = evomerge_cli("export", str(journal), "--out", str(tmp_path / "export"))
    assert report.returncode == 0 and export.returncode == 0, report.stderr + export.stderr
    assert (tmp_path / "report").is_dir() and any((tmp_path / "export").iterdir())
    _check(tmp_path, key, caplog.text, *capfd.readouterr(), report.stdout, report.stderr, export.stdout, export.stderr)


def _check(root: Path, key: str, *texts: str) -> None:
    assert files_holding(root, key) == []  # journal (+ WAL), report, plots, exports
    for text in texts:
        assert key not in text
