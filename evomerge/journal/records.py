"""`Trial`: one journaled evaluation, the row the scheduler commits before it counts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

from evomerge.recipe import MergeRecipe
from evomerge.score import Score


@dataclass(frozen=True)
class Trial:
    """An evaluation of `recipe` on `split`, asked as trial number `trial` of stage `stage`.

    ``objective`` is what the optimizer was told (loss + the space's penalty, or the failure
    penalty); ``cached`` marks a trial served from an identical recipe's result at no cost.
    """

    seq: int
    stage: int
    trial: int
    split: str
    z: tuple[float, ...]
    recipe: MergeRecipe
    score: Score
    objective: float
    cached: bool
    created: float

    @property
    def ok(self) -> bool:
        return self.score.ok

    @property
    def loss(self) -> float:
        return self.score.loss

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "stage": self.stage, "trial": self.trial, "split": self.split,
                "z": list(self.z), "recipe": self.recipe.to_dict(), **self.score.to_dict(),
                "objective": self.objective if math.isfinite(self.objective) else None,
                "cached": self.cached, "created": self.created}


def dumps(value: Any) -> str:
    """Compact JSON of a journal column (orjson: resume parses tens of thousands of rows)."""
    return orjson.dumps(value).decode()
