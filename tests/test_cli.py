"""The CLI end to end: the demo, outputs, report and export, and one clear line on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "evomerge", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_demo_search_report_export(tmp_path):
    journal = tmp_path / "demo.sqlite"
    res = run("search", "--backend", "python", "--budget", "60", "--journal", str(journal),
              "--output", str(tmp_path / "out"), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "best fit loss" in res.stdout
    recipe = json.loads((tmp_path / "out" / "best_recipe.json").read_text())
    assert recipe["method"] == "evo_tv" and len(recipe["weights"]) == 8  # the default space: evo_joint, task-vector form
    assert "merge_method: task_arithmetic" in (tmp_path / "out" / "mergekit.yaml").read_text()
    rep = run("report", str(journal), "--out", str(tmp_path / "rep"))
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "rep" / "convergence.png").stat().st_size > 1000
    exp = run("export", str(journal), "--out", str(tmp_path / "exp"))
    assert exp.returncode == 0, exp.stderr
    assert json.loads((tmp_path / "exp" / "best_recipe.json").read_text()) == recipe


@pytest.mark.parametrize("args, words", [
    (["search", "--optimizer", "adamw", "--budget", "5"], "unknown optimizer"),
    (["search", "--fitness", "no_such_module:f", "--budget", "5"], "cannot import fitness module"),
    (["search", "--fitness", "nocolon", "--budget", "5"], "MODULE:CALLABLE"),
    (["search", "--config", "missing.yaml"], "cannot read config"),
    (["search", "--config", "bad.yaml"], "malformed YAML"),
    (["search", "--config", "list.yaml"], "must be a YAML mapping"),
    (["search", "--config", "types.yaml"], "budget"),
    (["search", "--config", "extra.yaml"], "bogus"),
    (["search", "--journal", "corrupt.sqlite", "--resume", "--budget", "5"], "not a readable evomerge journal"),
    (["search", "--journal", "none.sqlite", "--resume", "--budget", "5"], "does not exist"),
    (["report", "corrupt.sqlite"], "not a readable evomerge journal"),
])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, args, words):
    (tmp_path / "bad.yaml").write_text("budget: [1,\n  2\n: x")
    (tmp_path / "list.yaml").write_text("- budget\n- 3\n")
    (tmp_path / "types.yaml").write_text("budget: lots\n")
    (tmp_path / "extra.yaml").write_text("budget: 5\nbogus: 1\n")
    (tmp_path / "corrupt.sqlite").write_bytes(b"\x00garbage" * 500)
    res = run(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: error:") and words in lines[0], res.stderr


@pytest.mark.parametrize("args, words", [(["search", "--budget", "0"], "positive"),
                                         (["search", "--budget", "abc"], "invalid"),
                                         (["search", "--backend", "gpu"], "invalid choice"),
                                         (["frobnicate"], "invalid choice")])
def test_usage_errors_are_one_line(args, words):
    res = run(*args)
    assert res.returncode == 2 and words in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
