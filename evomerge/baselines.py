"""Test-split metrics of the returned recipe beside the baselines a user would otherwise pick.

The uniform merge of every searched expert, each expert alone, and the best single expert (chosen
on the search examples, never on test) are scored on the test split after the search; the test
split never influences the search or the choice of recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from evomerge.backends._base import Evaluator
from evomerge.recipe import MergeRecipe, uniform


def single(expert: str) -> MergeRecipe:
    """One expert alone, at full strength (its own fine-tune)."""
    return MergeRecipe("task_arithmetic", (expert,), (1.0,))


@dataclass(frozen=True)
class TestReport:
    """Test metrics per entry ("best", "uniform", "best_single", "expert:NAME")."""

    rows: dict[str, dict[str, Any]]
    best_single: str | None
    tasks: tuple[str, ...] = ()
    examples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "best_single": self.best_single, "tasks": list(self.tasks),
                "examples": self.examples}


def _row(score: Any) -> dict[str, Any]:
    """The metrics of a test score (the blended loss of the reported metrics means nothing alone)."""
    return {"status": score.status, **{k: v for k, v in score.metrics.items() if "/" not in k}}


def compare_on_test(search: Evaluator, test: Evaluator, best: MergeRecipe, experts: Sequence[str],
                    selection_split: str) -> TestReport:
    """Score `best`, the uniform merge and each expert alone on test with the `test` evaluator (the
    reported metrics); pick the best single expert by the search loss on `selection_split`."""
    scored = test(best, "test")
    rows = {"best": _row(scored), "uniform": _row(test(uniform(experts), "test"))}
    chosen, low = None, math.inf
    for name in experts:
        sel = search(single(name), selection_split)
        if sel.ok and sel.loss < low:
            chosen, low = name, sel.loss
        rows[f"expert:{name}"] = _row(test(single(name), "test"))
    if chosen is not None:
        rows["best_single"] = {"expert": chosen, **rows[f"expert:{chosen}"]}
    tasks = sorted({k.split("/", 1)[1] for k in scored.metrics if "/" in k and not k.startswith("loss/")})
    return TestReport(rows, chosen, tuple(tasks), len(scored.example_ids))
