"""Choosing the recipe a search returns: shortlist by fit loss, decide on validation.

Minimising the loss on a few fit examples can drive the test metric down (DESIGN.md), so where a
validation split exists the top candidates by fit loss are re-scored on it and the best there
wins: first by the objective's rates alone (exact match, where it blends them with CE), then by
its whole loss, then by the fit loss. Without validation, the lowest fit loss wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from evomerge.journal import Trial
from evomerge.objectives import SELECTION
from evomerge.scheduler.loop import Shared, evaluate_once
from evomerge.score import Score


def rank_key(scores: Sequence[Score]) -> Callable[[Score], tuple[float, float]]:
    """How validation orders `scores`: by the objective's rates alone, then by its whole loss; by
    the loss alone where any of them lacks the rates (a journal from before they were recorded)."""
    rated = all(SELECTION in s.metrics for s in scores)
    return lambda s: (s.metrics[SELECTION] if rated else 0.0, s.loss)


def shortlist(trials: list[Trial], top_k: int) -> list[Trial]:
    """The `top_k` distinct successful recipes of lowest fit loss, best first."""
    seen: set[str] = set()
    out: list[Trial] = []
    for t in sorted((t for t in trials if t.ok), key=lambda t: (t.loss, t.trial)):
        key = t.recipe.key()
        if key not in seen:
            seen.add(key)
            out.append(t)
        if len(out) == top_k:
            break
    return out


def validate(shared: Shared, stage: int, candidates: list[Trial]) -> dict[int, Trial]:
    """Validation scores of `candidates` (journaled; cached where a recipe was scored before)."""
    return evaluate_once(shared, stage, [(t.trial, t.recipe) for t in candidates], "validation")


def choose(candidates: list[Trial],
           validation: dict[tuple[int, int], Trial] | None) -> tuple[Trial | None, Trial | None]:
    """The fit trial to return and its validation trial (None where no validation ran)."""
    if not candidates:
        return None, None
    if not validation:
        best = min(candidates, key=lambda t: (t.loss, t.stage, t.trial))
        return best, None
    scored = [(validation[(t.stage, t.trial)], t) for t in candidates
              if (t.stage, t.trial) in validation and validation[(t.stage, t.trial)].ok]
    if not scored:
        return min(candidates, key=lambda t: (t.loss, t.stage, t.trial)), None
    key = rank_key([v.score for v, _ in scored])
    val, best = min(scored, key=lambda vt: (*key(vt[0].score), vt[1].loss, vt[1].stage, vt[1].trial))
    return best, val
