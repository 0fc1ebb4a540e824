"""The spend ledger: one account of every query and token a search pays, reserved before it is sent.

A cap is money, so it must hold whatever runs the evaluations: threads, Ray actors in other
processes (each with its own copy of any object it was given), racing's minibatches and their
finishes, validation, the test table, retries, and attempts that time out or die. The ledger lives
with the scheduler, in the driver, and reserves per evaluation: before an evaluation is submitted
it reserves the evaluation's worst case (the evaluator factory's `bound`: every request with every
retry), which the evaluation gets as its own hard limit (`limit`); the reservation is committed to
the journal before anything is sent, and closed in the same transaction that records the result,
whose cost then replaces it. An evaluation whose real spend is unknown (timed out, its worker
dead) reports its whole limit as its cost. On resume the ledger starts from the journal: the
recorded costs plus every reservation a killed run left open, each at its whole limit; so the
provider never serves more than the cap, and the ledger says at most what was in flight at a kill
more than the provider served.

Near the cap an evaluation is granted what is left, as long as that covers it without retries;
one that then needs a retry fails as over its limit, and the search stops there.

An evaluator without a `bound` (a python fitness that reports queries) is admitted as before: each
evaluation in flight is assumed to cost as much as the most expensive one seen (one at a time
before any was seen), and gets no limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from evomerge.journal import Journal
from evomerge.score import Cost
from evomerge.spend import UsageCap

Bound = Callable[[str], tuple[Cost, Cost]]
"""split -> (the worst case of one evaluation on it, the least it needs without a retry)."""


@dataclass(frozen=True)
class Grant:
    """A reservation: `cost` is held until the evaluation is recorded. `limit` is what the
    evaluation may spend at most (None: not enforced, the evaluator has no bound or no cap is set)."""

    id: int | None
    cost: Cost
    limit: Cost | None


class Ledger:
    """Query and token caps over one search's evaluations, kept in a `UsageCap` (the arithmetic
    the api backend's own caps share); see the module docstring."""

    def __init__(self, journal: Journal, max_queries: int | None = None, max_tokens: int | None = None,
                 bound: Bound | None = None, spent: Cost | None = None) -> None:
        """`spent`: what was paid before (default: what the journal records, reservations left
        open included)."""
        self.journal = journal
        self._bound = bound
        self.cap = UsageCap(max_queries, max_tokens,
                            spent if spent is not None else journal.totals() + journal.outstanding())
        self._max_seen: Cost | None = None

    @property
    def spent(self) -> Cost:
        return self.cap.spent

    @property
    def active(self) -> bool:
        return self.cap.active

    def observe(self, cost: Cost) -> None:
        """A resumed evaluation's cost: sizes the admission of evaluators without a bound."""
        seen = self._max_seen or Cost()
        self._max_seen = Cost(max(seen.queries, cost.queries), max(seen.tokens, cost.tokens))

    def _grant_cost(self, split: str) -> Cost | None:
        """What an evaluation on `split` would be granted now, or None when it does not fit."""
        queries, tokens = self.cap.room()
        if self._bound is None:
            if self._max_seen is None:  # nothing seen: one at a time, while anything is left
                return Cost() if self.cap.idle and queries > 0 and tokens > 0 else None
            return self._max_seen if self.cap.fits(self._max_seen) else None
        full, least = self._bound(split)
        if not self.cap.fits(least) or queries <= 0:
            return None
        return Cost(int(min(full.queries, queries)), int(min(full.tokens, tokens)))

    def affords(self, split: str) -> bool:
        """Whether an evaluation on `split` could be reserved now."""
        return not self.active or self._grant_cost(split) is not None

    @property
    def idle(self) -> bool:
        """No reservation is held (so none will be released to make room)."""
        return self.cap.idle

    def reserve(self, stage: int, trial: int, split: str) -> Grant | None:
        """Reserve an evaluation of trial `trial` on `split`, journaled before it is sent; None
        when the caps leave too little now (later, once reservations in flight are settled, or never)."""
        if not self.active:
            return Grant(None, Cost(), None)
        cost = self._grant_cost(split)
        if cost is None:
            return None
        rid = self.journal.reserve(stage, trial, split, cost)
        self.cap.reserve(cost)
        return Grant(rid, cost, cost if self._bound is not None else None)

    def settle(self, grant: Grant | None, cost: Cost) -> None:
        """The reserved evaluation was recorded (`Journal.record(reservation=grant.id)`) at `cost`."""
        if grant is None or grant.id is None:
            return
        self.cap.settle(grant.cost, Cost(cost.queries, cost.tokens))
        self.observe(cost)
