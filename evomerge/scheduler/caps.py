"""Query and token caps: admit a paid evaluation only if the cap still holds at its worst case."""

from __future__ import annotations

from dataclasses import dataclass, field

from evomerge.score import Cost


@dataclass
class Caps:
    """Never let the sum of queries or tokens pass its cap.

    A candidate's cost is known only after it runs, so admission assumes each evaluation in flight
    costs as much as the most expensive one seen; before any has finished, one runs at a time.
    """

    max_queries: int | None = None
    max_tokens: int | None = None
    spent: Cost = field(default_factory=Cost)
    _max_seen: Cost = field(default_factory=Cost)
    _seen_any: bool = False

    @property
    def active(self) -> bool:
        return self.max_queries is not None or self.max_tokens is not None

    def observe(self, cost: Cost) -> None:
        self.spent = self.spent + cost
        self._seen_any = True
        self._max_seen = Cost(max(self._max_seen.queries, cost.queries), max(self._max_seen.tokens, cost.tokens))

    def admit(self, in_flight: int) -> bool:
        if not self.active:
            return True
        if not self._seen_any:
            return in_flight == 0 and not self.exhausted()
        n = in_flight + 1
        if self.max_queries is not None and self.spent.queries + n * self._max_seen.queries > self.max_queries:
            return False
        if self.max_tokens is not None and self.spent.tokens + n * self._max_seen.tokens > self.max_tokens:
            return False
        return True

    def exhausted(self) -> bool:
        return ((self.max_queries is not None and self.spent.queries >= self.max_queries)
                or (self.max_tokens is not None and self.spent.tokens >= self.max_tokens))
