"""Smoke test of the quality benchmark on the tiny zoo: it runs end to end, every searching method
pays exactly its budget, selection never looks at test, and the written table holds the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import quality
from benchmarks.quality_methods import DEFAULT


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from evomerge.zoo import ensure_tiny

    out = tmp_path_factory.mktemp("quality")
    result = quality.main(["--repository", str(ensure_tiny()), "--quick", "--budget", "5", "--settings", "indomain",
                           "--methods", DEFAULT, "paper_two_stage", "best_single",
                           "--search-per-task", "3", "--test-per-task", "2", "--top-k", "2", "--out", str(out), "--tag", "smoke"])
    return out, result


def test_searches_pay_their_budget_and_default_selects_on_validation(run):
    _, result = run
    rows = {r["method"]: r for r in result["settings"][0]["rows"]}
    assert rows[DEFAULT]["fit_evals"] == 5 and rows["paper_two_stage"]["fit_evals"] == 5
    assert rows[DEFAULT]["val_evals"] >= 1, "the default search must re-score its top candidates on validation"
    assert rows["paper_two_stage"]["val_evals"] == 0, "the paper-faithful search selects by fit loss alone"
    for r in rows.values():
        assert 0.0 <= r["test_em"] <= 1.0 and 0.0 <= r["fit_em"] <= 1.0


def test_best_single_is_the_lowest_search_loss(run):
    _, result = run
    setting = result["settings"][0]
    row = next(r for r in setting["rows"] if r["method"] == "best_single")
    losses = [r for r in setting["references"] if r["method"].startswith("expert:")]
    assert len(losses) >= len(setting["tasks"])
    ranking = setting["best_single_ranking"]
    assert len(ranking) == setting["experts"]
    assert row["recipe"]["experts"] == [ranking[0][0]]
    assert row["search_loss"] == pytest.approx(min(loss for _, loss in ranking))


def test_outputs_hold_the_table_and_curve(run):
    out, result = run
    md = (out / "quality_smoke.md").read_text()
    data = json.loads((out / "quality_smoke.json").read_text())
    assert (out / "quality_smoke_indomain.png").stat().st_size > 1000
    default = next(r for r in data["settings"][0]["rows"] if r["method"] == DEFAULT)
    assert f"| **{DEFAULT}** (default) | {default['test_em']:.3f} |" in md
    assert data["settings"][0]["curves"][DEFAULT][0], "the default search has a best-so-far test curve"


def test_combine_pools_parts_into_one_report(run, tmp_path):
    out, result = run
    part = json.loads((out / "quality_smoke.json").read_text())
    other = json.loads(json.dumps(part))
    other["seeds"] = [1]
    other["settings"][0]["rows"] = [dict(r, seed=1) for r in other["settings"][0]["rows"] if r["seed"] is not None]
    (tmp_path / "b.json").write_text(json.dumps(other))
    combined = quality.main(["--combine", str(out / "quality_smoke.json"), str(tmp_path / "b.json"),
                             "--out", str(tmp_path), "--tag", "both"])
    setting = combined["settings"][0]
    assert combined["seeds"] == [0, 1]
    assert len(setting["rows"]) == len(part["settings"][0]["rows"]) + len(other["settings"][0]["rows"])
    assert len(setting["curves"][DEFAULT]) == 2
    assert len(setting["references"]) == len(part["settings"][0]["references"])
    assert f"| **{DEFAULT}** (default) |" in (tmp_path / "quality_both.md").read_text()


def test_rescore_reproduces_the_run_on_its_own_test_split_and_widens_it(run, tmp_path):
    out, result = run
    recorded = str(out / "quality_smoke.json")
    same = quality.main(["--rescore", recorded, "--test-per-task", "2", "--settings", "indomain", "--out", str(tmp_path)])
    before, after = result["settings"][0], same["settings"][0]
    assert [r["test_em_tasks"] for r in after["rows"]] == [r["test_em_tasks"] for r in before["rows"]]
    assert [r["test_ce"] for r in after["rows"]] == pytest.approx([r["test_ce"] for r in before["rows"]], rel=1e-6)
    assert after["experts_on_own_tasks"] == before["experts_on_own_tasks"]
    wider = quality.main(["--rescore", recorded, "--test-per-task", "4", "--settings", "indomain", "--out", str(tmp_path),
                          "--tag", "wider"])
    setting = wider["settings"][0]
    assert setting["test"] == 2 * before["test"] and setting["curves"] == {}
    assert [r["fit_em"] for r in setting["rows"]] == [r["fit_em"] for r in before["rows"]]
    assert all(a["test_ce"] != b["test_ce"] for a, b in zip(setting["rows"], before["rows"]))  # scored anew
    md = (tmp_path / "quality_wider.md").read_text()
    assert "re-scored on the first 4 test examples per task" in md and "best-so-far test EM" not in md
    assert "`python -m benchmarks.quality --rescore " in md  # the command that re-scored, not the caller's argv
    default = next(r for r in setting["rows"] if r["method"] == DEFAULT)
    assert f"| **{DEFAULT}** (default) | {default['test_em']:.3f} |" in md


def test_em_case_reproduces_the_reports_exact_match_and_never_exceeds_it_cased(run):
    from benchmarks import em_case

    out, result = run
    rows, own = em_case.main([str(out / "quality_smoke.json"), "--setting", "indomain"])
    setting = result["settings"][0]
    assert {task: f for task, (f, _) in own.items()} == pytest.approx(setting["experts_on_own_tasks"])
    assert all(c <= f for f, c in own.values())
    scored = setting["rows"] + setting["references"]
    assert any(row["test_em"] > 0 for row in scored), "the check needs a recipe that gets some answers right"
    seen: dict[str, int] = {}
    for row in scored:  # em_case keeps each method's recipes in the report's order
        seen[row["method"]] = seen.get(row["method"], -1) + 1
        forgiving, cased = rows[row["method"]][seen[row["method"]]]
        assert forgiving == pytest.approx(row["test_em"]), row["method"]
        assert cased <= forgiving


def test_a_raced_run_gets_the_query_efficiency_figure(tmp_path):
    recorded = Path(quality.__file__).parent / "results" / "quality_tiny-race-b120.json"
    data = json.loads(recorded.read_text())
    quality.main(["--combine", str(recorded), "--out", str(tmp_path), "--tag", "raced"])
    assert (tmp_path / "quality_raced_ood_race.png").stat().st_size > 1000
    md = (tmp_path / "quality_raced.md").read_text()
    assert "](quality_raced_ood_race.png)" in md
    race = data["settings"][0]["race"][0]
    share = race["race_evals_worth"] / race["full_evals_worth"]
    assert f"{race['race_evals_worth']:.1f} evaluations-worth of queries vs {race['full_evals_worth']:.1f} " \
           f"(seed {race['seed']}, {share:.0%})" in md


def test_a_run_cut_short_keeps_the_methods_it_finished(tmp_path, monkeypatch):
    from evomerge.zoo import ensure_tiny

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the fault: the run dies in its second method (a device lease ending)

    monkeypatch.setattr(quality, "run_fixed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quality.main(["--repository", str(ensure_tiny()), "--quick", "--budget", "4", "--settings", "ood",
                      "--methods", DEFAULT, "best_single", "--search-per-task", "3", "--test-per-task", "2",
                      "--top-k", "1", "--out", str(tmp_path), "--tag", "cut"])
    setting = json.loads((tmp_path / "quality_cut.json").read_text())["settings"][0]
    assert [r["method"] for r in setting["rows"]] == [DEFAULT] and setting["complete"] is False
    assert setting["rows"][0]["fit_evals"] == 4  # the budget, paid exactly
    quality.main(["--combine", str(tmp_path / "quality_cut.json"), "--out", str(tmp_path), "--tag", "pooled"])
    md = (tmp_path / "quality_pooled.md").read_text()
    assert "cut short" in md and f"| **{DEFAULT}** (default) |" in md
