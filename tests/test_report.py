"""`evomerge report` writes files whose numbers are the journal's."""

import re

import evomerge
from evomerge.demo import EXPERTS, demo_fitness
from evomerge.journal import Journal
from evomerge.report import write_report
from evomerge.search_spaces import build_space


def test_report_numbers_match_the_journal(tmp_path):
    calls = []

    def sometimes_failing(recipe):
        calls.append(1)
        if len(calls) % 7 == 0:
            raise RuntimeError("provider down")
        return {**demo_fitness(recipe), "queries": 3, "tokens": 40}

    path = tmp_path / "run.sqlite"
    result = evomerge.search(sometimes_failing, build_space("evo", list(EXPERTS)), budget=45, seed=4, journal=path)
    with Journal.open(path) as j:
        j.set_meta("test_report", {"rows": {"best": {"status": "ok", "ce": 0.25, "exact_match": 0.75},
                                            "uniform": {"status": "ok", "ce": 0.5, "exact_match": 0.5}},
                                   "best_single": None})
        trials = j.trials(split="fit")
        totals = j.totals()
    paths = write_report(path, tmp_path / "report")
    text = paths["report"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    paid = [t for t in trials if not t.cached]
    failed = [t for t in paid if not t.ok]
    assert f"{len(paid)} paid evaluations" in text and f"{len(failed)} failed" in text
    assert f"Cost: {totals.queries} queries, {totals.tokens} tokens" in text
    assert totals.queries == 3 * (len(paid) - len(failed))
    chosen = re.search(r"Chosen: stage (\d+), trial (\d+), method `(\w+)`; fit loss ([\d.e+-]+)", text)
    assert (int(chosen[1]), int(chosen[2])) == (result.best.stage, result.best.trial)
    assert float(chosen[4]) == float(f"{result.best_loss:.5g}")
    for i, name in enumerate(result.best_recipe.experts):
        assert f"| {name} | {result.best_recipe.weights[i]:.4f} |" in text
    for stage in (0, 1):
        ok = [t.loss for t in paid if t.stage == stage and t.ok]
        assert f"| {stage} | {len([t for t in paid if t.stage == stage])} | {min(ok):.5g} |" in text
    assert "| best | 0.25 | 0.75 |" in text and "| uniform | 0.5 | 0.5 |" in text
    assert text.count("provider down") == len(failed)
