"""Per-example scores of recent recipes, so no example is scored twice for the same candidate.

Racing scores a candidate on a minibatch of the fit examples first and finishes the promising
ones on every fit example; without this memo the finish would pay for the minibatch again (a
quarter of the fit set, on every finished candidate). Keyed by recipe and metrics, per backend
instance: with several workers a finish is cheaper when it lands on the worker that scored the
minibatch, and correct either way.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from evomerge.tasks import Example

PerExample = dict[str, np.ndarray]


class ExampleMemo:
    """The per-example metric values of the last `recipes` recipes scored (0: remember none)."""

    def __init__(self, recipes: int = 64) -> None:
        self.recipes = recipes
        self._lock = threading.Lock()  # threads of one executor may share a backend
        self.scored = 0
        """Examples scored through the memo (reused ones excluded): what the candidates paid."""
        self._values: OrderedDict[tuple[str, tuple[str, ...]], dict[Example, dict[str, float]]] = OrderedDict()

    def remember(self, key: tuple[str, tuple[str, ...]], examples: Sequence[Example],
                 values: Mapping[str, Sequence[float]]) -> None:
        """Take per-example values scored elsewhere (racing's minibatch, on another worker: a Score's `per_example`)."""
        with self._lock:
            known = self._values.setdefault(key, {})
            for i, e in enumerate(examples):
                known[e] = {name: float(v[i]) for name, v in values.items()}

    def scores(self, key: tuple[str, tuple[str, ...]], examples: Sequence[Example],
               score: Callable[[list[Example]], PerExample]) -> PerExample:
        """Per-example values on `examples` for (recipe key, metrics) `key`; `score` is called
        once, on the examples not already known, or not at all when every one is."""
        with self._lock:
            known = dict(self._values.get(key, {}))
        missing = list(dict.fromkeys(e for e in examples if e not in known))
        fresh: dict[Example, dict[str, float]] = {}
        if missing:
            values = score(missing)  # may raise: the memo is left as it was
            fresh = {e: {name: float(v[i]) for name, v in values.items()} for i, e in enumerate(missing)}
            known.update(fresh)
        with self._lock:
            self.scored += len(missing)
            self._values.setdefault(key, {}).update(fresh)
            self._values.move_to_end(key)
            while len(self._values) > self.recipes:
                self._values.popitem(last=False)
        names = next(iter(known.values())).keys() if known else ()
        return {name: np.array([known[e][name] for e in examples]) for name in names}
