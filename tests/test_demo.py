"""The README's commands end to end on the tiny zoo: the embedded api demo and a local search."""

import json
import os
import subprocess
import sys
from pathlib import Path

from evomerge.backends.local import LocalEvaluatorFactory
from evomerge.journal import Journal
from evomerge.recipe import uniform
from evomerge.repository import Repository
from evomerge.tasks import load_splits
from evomerge.config import TaskConfig

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "evomerge", "search", "--no-progress", *args], env=env,
                          capture_output=True, text=True, timeout=900)


def test_embedded_api_demo(tiny_zoo, tmp_path):
    """No --api-base: the reference provider starts on loopback over the demo zoo; the search goes
    through real HTTP and the test table compares the result with the baselines."""
    res = cli("--backend", "api", "--budget", "16", "--journal", str(tmp_path / "api.sqlite"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "starting the reference provider" in res.stdout
    for row in ("best", "uniform", "best_single", "expert:upper"):
        assert row in res.stdout
    with Journal.open(tmp_path / "api.sqlite") as j:
        assert j.count("fit") == 16
        assert j.totals().queries >= 16  # every paid evaluation queried the provider
        report = j.meta("test_report")
    best = json.loads(report)["rows"]["best"]
    assert best["status"] == "ok" and {"ce", "exact_match"} <= set(best)  # the reported test metrics


def test_local_demo_merge_wins_on_exact_match(tiny_zoo, tmp_path):
    """The demo's default target (the zoo's first out-of-domain task, capitals of the first letter)
    has no expert: the found merge must beat the uniform merge on the search loss, and the uniform
    merge and every expert alone on cased exact match of the test split."""
    res = cli("--backend", "local", "--budget", "40", "--seed", "0", "--journal", str(tmp_path / "local.sqlite"),
              "--output", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "searching for upper_first" in res.stdout
    with Journal.open(tmp_path / "local.sqlite") as j:
        best = min((t for t in j.trials(split="fit") if t.ok), key=lambda t: t.loss)
    repo = Repository.open(tiny_zoo)
    splits = load_splits(TaskConfig(), repo)
    evaluate = LocalEvaluatorFactory(str(tiny_zoo), splits)()
    assert best.loss < evaluate(uniform(sorted(repo.experts)), "fit").loss
    rows = json.loads((tmp_path / "out" / "test_report.json").read_text())["rows"]
    assert all(f"expert:{name}" in rows for name in repo.experts)
    em = {name: row["exact_match"] for name, row in rows.items()}
    assert em["best"] > max(v for name, v in em.items() if name != "best"), em  # every expert alone included


def test_a_users_own_folder_and_task_files(tiny_zoo, tmp_path):
    """What a user brings: a base/ + experts/ folder (no zoo.json) and JSONL files, given by flags
    alone; the defaults search on the file's examples and the test table scores the test file."""
    repo = tmp_path / "mine"
    (repo / "experts").mkdir(parents=True)
    (repo / "base").symlink_to(tiny_zoo / "base")
    for expert in (tiny_zoo / "experts").iterdir():
        (repo / "experts" / expert.name).symlink_to(expert)
    tasks = json.loads((tiny_zoo / "zoo.json").read_text())["tasks"]["final_letter"]
    for split in ("search", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "final_letter.jsonl").write_text((tiny_zoo / tasks[split]).read_text())
    res = cli("--backend", "local", "--repository", str(repo), "--task-file", str(tmp_path / "search" / "final_letter.jsonl"),
              "--test-file", str(tmp_path / "test" / "final_letter.jsonl"), "--budget", "30",
              "--journal", str(tmp_path / "mine.sqlite"), "--output", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "test_report.json").read_text())
    assert report["tasks"] == ["final_letter"] and report["examples"] == 40
    em = {name: row["exact_match"] for name, row in report["rows"].items()}
    assert em["best"] > em["uniform"], em
