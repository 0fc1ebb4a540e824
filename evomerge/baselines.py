"""Test-split metrics of the returned recipe beside the baselines a user would otherwise pick.

The uniform merge of every searched expert, each expert alone, and the best single expert (chosen
on the search examples, never on test) are scored on the test split after the search; the test
split never influences the search or the choice of recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from evomerge.objectives import SELECTION
from evomerge.recipe import MergeRecipe, uniform
from evomerge.scheduler.selection import rank_key
from evomerge.score import Cost, Score

if TYPE_CHECKING:
    from evomerge.api import SearchResult
    from evomerge.backends import Prepared
    from evomerge.config import SearchConfig


TABLES = ("none", "summary", "full")
SUMMARY_ABOVE = 16
"""Experts beyond which the test table is a summary by default (best, uniform, best single): the
full table pays two evaluations per expert, hundreds of paid calls for a repository of hundreds."""

Scorer = Callable[[list[tuple[int, MergeRecipe]], str], dict[int, Score]]
"""(numbered recipes, split) -> their scores; a recipe the caps cannot pay for is left out."""


def single(expert: str) -> MergeRecipe:
    """One expert alone, at full strength (its own fine-tune)."""
    return MergeRecipe("task_arithmetic", (expert,), (1.0,))


@dataclass(frozen=True)
class TestReport:
    """Test metrics per entry ("best", "uniform", "best_single", "expert:NAME") and what they cost."""

    rows: dict[str, dict[str, Any]]
    best_single: str | None
    tasks: tuple[str, ...] = ()
    examples: int = 0
    cost: Cost = Cost()

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "best_single": self.best_single, "tasks": list(self.tasks),
                "examples": self.examples, "cost": self.cost.to_dict()}


UNPAID = {"status": "not scored", "error": "the query/token caps were spent before this entry"}


def _row(score: Score | None) -> dict[str, Any]:
    """The metrics of a test score (the blended loss of the reported metrics means nothing alone),
    or why there are none."""
    if score is None:
        return dict(UNPAID)
    if not score.ok:
        return {"status": score.status, "error": score.error}
    return {"status": score.status, **{k: v for k, v in score.metrics.items() if "/" not in k and k != SELECTION}}


def compare_on_test(score: Scorer, best: MergeRecipe, experts: Sequence[str], selection_split: str,
                    table: str = "full") -> TestReport:
    """Score `best`, the uniform merge and (``full``) each expert alone on test with `score`
    (which uses the reported metrics on "test" and the search's loss elsewhere); the best single
    expert is chosen on `selection_split` as a search's result is (`rank_key`), and ``summary``
    tests only that one.
    Entries are numbered alike in both tables (0 best, 1 uniform, 2 + i expert i), so a resumed
    run finds the entries it journaled."""
    singles = [(2 + i, single(name)) for i, name in enumerate(experts)]
    selection = {k: s for k, s in score(singles, selection_split).items() if s.ok}
    key = rank_key(list(selection.values()))
    chosen = experts[min(selection, key=lambda k: (*key(selection[k]), k)) - 2] if selection else None
    tested = [(0, best), (1, uniform(experts))]
    tested += singles if table == "full" else [(2 + experts.index(chosen), single(chosen))] if chosen else []
    scores = score(tested, "test")
    rows = {"best": _row(scores.get(0)), "uniform": _row(scores.get(1))}
    if table == "full":
        rows.update({f"expert:{name}": _row(scores.get(2 + i)) for i, name in enumerate(experts)})
    if chosen is not None:
        rows["best_single"] = {"expert": chosen, **_row(scores.get(2 + experts.index(chosen)))}
    first = next((s for s in scores.values() if s.ok), None)
    keys = first.metrics if first else {}
    tasks = sorted({k.split("/", 1)[1] for k in keys if "/" in k and not k.startswith("loss/")})
    return TestReport(rows, chosen, tuple(tasks), len(first.example_ids) if first else 0)


TEST_STAGE = -1
"""The journal stage of the test table's evaluations (after every search stage)."""


def run_test_table(config: SearchConfig, prepared: Prepared, result: SearchResult) -> TestReport | None:
    """The test table (`compare_on_test`) after a configured run, paid through the same spend
    ledger as the search: each evaluation reserved under the caps that are left, journaled (stage
    -1), reused on resume, and what the table cost reported with it. ``config.test_table`` None: a
    summary when the repository has more than `SUMMARY_ABOVE` experts, else the full table."""
    table = config.test_table or ("summary" if len(prepared.experts) > SUMMARY_ABOVE else "full")
    splits = prepared.evaluator.splits
    if table == "none" or splits is None or not splits.test:
        return None
    from evomerge.journal import Journal
    from evomerge.objectives import Objective
    from evomerge.scheduler.ledger import Ledger
    from evomerge.scheduler.loop import Shared, evaluate_once
    from evomerge.scheduler.threads import ThreadExecutor

    searcher: Any = prepared.evaluator
    tester = replace(searcher, objective=Objective(dict.fromkeys(config.test_metrics, 1.0)))
    paid = getattr(tester, "bound", None) is not None
    bound = (lambda split: (tester if split == "test" else searcher).bound(split)) if paid else None
    kept = config.journal is not None
    journal = Journal.open(config.journal) if config.journal is not None else Journal.create(":memory:", {})
    ledger = Ledger(journal, config.max_queries, config.max_tokens, bound,
                    None if kept else result.cost + prepared.spent)
    before = ledger.spent
    resumed = journal.trials(stage=TEST_STAGE)
    pools = {"test": ThreadExecutor(tester), "selection": ThreadExecutor(searcher)}

    def score(items: list[tuple[int, Any]], split: str) -> dict[int, Any]:
        pool = pools["test" if split == "test" else "selection"]
        shared = Shared(pool, journal, ledger, resumed=resumed, paid=paid)
        return {k: t.score for k, t in evaluate_once(shared, TEST_STAGE, items, split).items()}

    try:
        report = compare_on_test(score, result.best_recipe, prepared.experts,
                                 "validation" if splits.validation else "fit", table)
        report = replace(report, cost=ledger.spent + Cost(-before.queries, -before.tokens))
        journal.set_meta("test_report", report.to_dict())
    finally:
        for pool in pools.values():
            pool.shutdown()
        journal.close()
    return report
