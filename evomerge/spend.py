"""`UsageCap`: the one place where spend is checked against a query or token cap.

Both spend accounts hold one: the search's ledger (`evomerge.scheduler.ledger`), which reserves
a whole evaluation's bound before it is sent, and the api backend (`evomerge.backends.transport`),
which reserves every request inside an evaluation, on its own caps and on the evaluation's limit.
A reservation is held until it settles to what was used (or is released unused), so what is
spent plus what is held never passes a cap, whatever runs in parallel.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from evomerge.errors import BudgetExhausted
from evomerge.score import Cost


class UsageCap:
    """Query and token caps (None: no cap), what was spent under them and what reservations hold.

    Thread-safe (evaluations on several threads share one) and picklable (a worker gets a copy).
    """

    def __init__(self, max_queries: int | None = None, max_tokens: int | None = None,
                 spent: Cost | None = None) -> None:
        self.max_queries, self.max_tokens = max_queries, max_tokens
        self.spent = spent if spent is not None else Cost()
        self._held = Cost()
        self._holds = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def queries(self) -> int:
        return self.spent.queries

    @property
    def tokens(self) -> int:
        return self.spent.tokens

    @property
    def active(self) -> bool:
        """Whether any cap is set."""
        return self.max_queries is not None or self.max_tokens is not None

    @property
    def idle(self) -> bool:
        """No reservation is held (so none will be released to make room)."""
        with self._lock:
            return not self._holds

    @property
    def exhausted(self) -> bool:
        """True once no further query may be sent (the scheduler stops asking for candidates)."""
        return self.room()[0] <= 0

    def room(self) -> tuple[float, float]:
        """(queries, tokens) left beyond what is spent and held; inf where there is no cap."""
        with self._lock:
            return self._room()

    def _room(self) -> tuple[float, float]:
        used = self.spent + self._held
        return ((math.inf if self.max_queries is None else self.max_queries - used.queries),
                (math.inf if self.max_tokens is None else self.max_tokens - used.tokens))

    def fits(self, cost: Cost) -> bool:
        """Whether `cost` more fits now (checked before starting what will reserve it piece by piece)."""
        queries, tokens = self.room()
        return cost.queries <= queries and cost.tokens <= tokens

    def reserve(self, cost: Cost) -> None:
        """Hold `cost` until it settles; `BudgetExhausted`, holding nothing, if it would pass a cap."""
        with self._lock:
            queries, tokens = self._room()
            if cost.queries > queries:
                raise BudgetExhausted(f"the query cap ({self.max_queries}) is reached; raise --max-queries to go on")
            if cost.tokens > tokens:
                raise BudgetExhausted(f"the token cap ({self.max_tokens}) would be passed by a {cost.tokens}-token "
                                      "request; raise --max-tokens to go on")
            self._held = self._held + cost
            self._holds += 1

    def settle(self, reserved: Cost, used: Cost | None) -> None:
        """Turn a reservation into spending (`used`), or release it (`used` None: nothing was served)."""
        with self._lock:
            self._held = Cost(self._held.queries - reserved.queries, self._held.tokens - reserved.tokens)
            self._holds -= 1
            if used is not None:
                self.spent = self.spent + used
