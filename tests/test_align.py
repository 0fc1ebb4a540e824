"""`align`: a local search over several tasks merges RegMean-aligned copies of the experts, and what
it hands back (the adapter, `evomerge export` from the journal, the test table) is that merge."""

from __future__ import annotations

import io
import shutil
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from evomerge.api import run  # noqa: E402
from evomerge.cli import main  # noqa: E402
from evomerge.config import SearchConfig  # noqa: E402
from evomerge.repository import ALIGNED_SUFFIX  # noqa: E402
from evomerge.tasks import Example, write_jsonl  # noqa: E402
from tests.helpers.bpe import PROVIDER_EXPERTS, build_tiny_repository  # noqa: E402
from tests.helpers.exported import logits_of, merged_logits  # noqa: E402

EXPERTS = tuple(sorted(PROVIDER_EXPERTS))


@pytest.fixture(scope="module")
def aligned_run(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module) -> dict:
    root = tmp_path_factory.mktemp("align")
    monkeypatch_module.setenv("EVOMERGE_CACHE", str(root / "cache"))
    write_jsonl(root / "sky.jsonl",
                [Example(f"Question {i}: sky? Answer:", " blue", task="sky", id=f"s{i}") for i in range(6)])
    write_jsonl(root / "sum.jsonl", [Example(f"{i} + {i} =", f" {2 * i}", task="sum", id=f"m{i}") for i in range(6)])
    write_jsonl(root / "test.jsonl", [Example("Question 9: sky? Answer:", " blue", task="sky", id="t0"),
                                      Example("7 + 7 =", " 14", task="sum", id="t1")])
    repo = build_tiny_repository(root / "repo")
    config = SearchConfig(backend="local", repository=repo, budget=5, journal=root / "run.sqlite",  # aligned only
                          output=root / "out", test_metrics=["ce"],
                          task={"files": [root / "sky.jsonl", root / "sum.jsonl"], "test_files": [root / "test.jsonl"]})
    with redirect_stdout(io.StringIO()) as printed:
        result, report = run(config, progress=False)
    return {"root": root, "repo": repo, "config": config, "result": result, "report": report,
            "printed": printed.getvalue()}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def aligned_root(cache: Path) -> Path:
    (found,) = (cache / "aligned").iterdir()
    return found


def test_the_search_merges_aligned_copies_and_the_adapter_is_that_merge(aligned_run) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = aligned_run["result"].best_recipe
    assert recipe.experts == tuple(e + ALIGNED_SUFFIX for e in EXPERTS)
    assert "RegMean-aligned 3 experts to 2 tasks" in aligned_run["printed"]
    root, repo = aligned_run["root"], aligned_run["repo"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(repo / "base"), dtype=torch.float32),
                                      str(root / "out" / "adapter"))
    scored = merged_logits(aligned_root(root / "cache"), recipe)
    torch.testing.assert_close(logits_of(model, repo), scored, rtol=0, atol=1e-4)
    unaligned = replace(recipe, experts=EXPERTS)
    assert float((merged_logits(aligned_run["repo"], unaligned) - scored).abs().max()) > 1e-3  # alignment changed it


def test_the_test_table_compares_with_the_experts_as_they_are(aligned_run) -> None:
    rows = aligned_run["report"].rows
    assert {f"expert:{e}" for e in EXPERTS} <= set(rows)
    assert not any(ALIGNED_SUFFIX in name for name in rows)


def test_export_from_the_journal_rebuilds_a_lost_alignment(aligned_run, tmp_path) -> None:
    from safetensors.torch import load_file

    root = aligned_run["root"]
    shutil.rmtree(root / "cache" / "aligned")
    assert main(["export", str(root / "run.sqlite"), "--out", str(tmp_path / "exp"),
                 "--adapter", str(tmp_path / "adapter")]) == 0
    ours, theirs = (load_file(str(d / "adapter_model.safetensors"))
                    for d in (tmp_path / "adapter", root / "out" / "adapter"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)
    yaml = (tmp_path / "exp" / "mergekit.yaml").read_text()
    assert "RegMean-aligned copies" in yaml and f"colour{ALIGNED_SUFFIX}" in yaml


def test_a_budget_for_two_searches_searches_both_families(aligned_run) -> None:
    config = aligned_run["config"].model_copy(update={"budget": 16, "journal": None, "output": None,
                                                      "test_table": "none"})
    result, _ = run(config, progress=False)
    assert {t.recipe.experts for t in result.trials} == {EXPERTS, tuple(e + ALIGNED_SUFFIX for e in EXPERTS)}
    assert sum(s.budget for s in result.stages) == 16


def test_align_none_merges_the_experts_as_they_are(aligned_run) -> None:
    config = aligned_run["config"].model_copy(update={"align": "none", "journal": None, "output": None})
    result, _ = run(config, progress=False)
    assert result.best_recipe.experts == EXPERTS


def test_one_task_is_searched_as_before(aligned_run) -> None:
    root = aligned_run["root"]
    config = aligned_run["config"].model_copy(update={
        "journal": None, "output": None, "test_table": "none", "budget": 4,
        "task": aligned_run["config"].task.model_copy(update={"files": [root / "sky.jsonl"], "test_files": []})})
    keys = set((root / "cache" / "aligned").iterdir())
    result, _ = run(config, progress=False)
    assert {t.recipe.experts for t in result.trials} == {EXPERTS}
    assert set((root / "cache" / "aligned").iterdir()) == keys  # nothing aligned


def test_align_regmean_on_one_task_is_one_line_and_exit_2(aligned_run, capsys) -> None:
    root = aligned_run["root"]
    code = main(["search", "--backend", "local", "--repository", str(aligned_run["repo"]), "--budget", "2",
                 "--task-file", str(root / "sky.jsonl"), "--align", "regmean", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "align: regmean cannot apply" in err[0] and "two tasks" in err[0], err
