"""`Score`: what one evaluation of a recipe returns, success or failure, with its exact cost."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec

P = ParamSpec("P")

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_STOPPED = "stopped"
"""Scored on a minibatch only and stopped there by racing (its loss is the minibatch loss)."""


@dataclass(frozen=True)
class Cost:
    """What an evaluation consumed: provider queries, tokens, wall-clock seconds."""

    queries: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.queries + other.queries, self.tokens + other.tokens, self.seconds + other.seconds)

    def to_dict(self) -> dict[str, Any]:
        return {"queries": self.queries, "tokens": self.tokens, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Cost:
        data = data or {}
        return cls(int(data.get("queries", 0)), int(data.get("tokens", 0)), float(data.get("seconds", 0.0)))


@dataclass(frozen=True)
class Score:
    """The loss of one recipe on one set of examples (lower is better), never None.

    A failure is a Score too (status ``failed``, loss NaN, the error text), so one bad candidate
    never ends a search. ``per_example`` maps a metric name to one value per example, in the order
    of ``example_ids``, so a candidate can be re-scored on a subset without querying again.
    """

    loss: float
    metrics: Mapping[str, float] = field(default_factory=dict)
    cost: Cost = field(default_factory=Cost)
    status: str = STATUS_OK
    error: str | None = None
    per_example: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    example_ids: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK and math.isfinite(self.loss)

    @classmethod
    def failed(cls, error: str, cost: Cost | None = None) -> Score:
        return cls(loss=math.nan, status=STATUS_FAILED, error=error, cost=cost or Cost())

    @classmethod
    def from_exception(cls, exc: BaseException, cost: Cost | None = None) -> Score:
        """The failed Score an exception becomes: "Type: message" (journals and tests compare this
        text), with what the attempt cost."""
        return cls.failed(f"{type(exc).__name__}: {exc}", cost or Cost())

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss if math.isfinite(self.loss) else None, "metrics": dict(self.metrics),
                "cost": self.cost.to_dict(), "status": self.status, "error": self.error,
                "per_example": {k: list(v) for k, v in self.per_example.items()},
                "example_ids": list(self.example_ids)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Score:
        loss = data.get("loss")
        return cls(loss=math.nan if loss is None else float(loss), metrics=dict(data.get("metrics") or {}),
                   cost=Cost.from_dict(data.get("cost")), status=data.get("status", STATUS_OK),
                   error=data.get("error"),
                   per_example={k: tuple(v) for k, v in (data.get("per_example") or {}).items()},
                   example_ids=tuple(data.get("example_ids") or ()))


def attempt_batch(call: Callable[[], Sequence[Score]], count: int) -> list[Score]:
    """The scores `call` gives for `count` candidates, or, if it raises, `count` failed Scores
    carrying the time it took: a candidate's failure is data, not a crash, at every layer that
    runs an evaluator (a backend, a worker thread, a Ray actor, the loop reading a future)."""
    start = time.perf_counter()
    try:
        return list(call())
    except Exception as exc:
        return [Score.from_exception(exc, Cost(seconds=time.perf_counter() - start))] * count


def attempt(call: Callable[P, Score], *args: P.args, **kwargs: P.kwargs) -> Score:
    """`call(*args, **kwargs)`, or the failed Score its exception becomes (one-candidate `attempt_batch`)."""
    return attempt_batch(lambda: [call(*args, **kwargs)], 1)[0]
