"""CMA-ES (pycma) behind an ask/tell that never blocks, for an asynchronous scheduler.

pycma thinks in generations: ask λ points, tell λ results. An asynchronous scheduler keeps W
candidates in flight and asks again as soon as one returns, so:
- `ask` hands out the current generation's samples one by one; when they are all out and the
  generation is still incomplete, it samples λ more from the same distribution (ask-ahead).
- `tell` buffers results in arrival order; every λ results make one pycma generation. Points
  from an older distribution, or never asked at all (a replayed journal), are told with
  ``check_points=True``: pycma repairs their Mahalanobis length against the current
  distribution, so a stale outlier cannot blow up the step size.
Randomness comes from a private generator handed to pycma as its ``randn``, never numpy's global
one, so the same seed and the same calls give the same points, and a pickle resumes exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge._imports import require
from evomerge.errors import ConfigError
from evomerge.optimizers._base import Optimizer, register_optimizer


class _Normal:
    """A picklable standard-normal sampler with its own state (pycma's ``randn`` option)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.RandomState(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


@register_optimizer("cma")
class CMAOptimizer(Optimizer):
    """pycma's CMA-ES with box bounds (its bound transform keeps samples inside the box)."""

    name = "cma"

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray, sigma0: float, seed: int,
                 popsize: int | None = None, budget: int | None = None,
                 cma_options: dict[str, Any] | None = None) -> None:
        super().__init__(lower, upper, x0, sigma0, seed, popsize, budget)
        cma = require("cma", "the cma optimizer")
        opts = {"bounds": [self.lower.tolist(), self.upper.tolist()], "popsize": self.popsize,
                "randn": _Normal(self.seed), "seed": float("nan"), "verbose": -9, "verb_log": 0,
                "verb_disp": 0, **(cma_options or {})}
        try:
            self.es = cma.CMAEvolutionStrategy(self.x0.tolist(), self.sigma0, opts)
        except ValueError as exc:
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"cma rejected its options {sorted(cma_options or {})}: {reason}") from None
        self._queue: list[np.ndarray] = []
        self._open = False  # pycma has been asked since its last tell
        self._buffer: list[tuple[np.ndarray, float]] = []
        self.generations = 0

    def _sample(self) -> None:
        self._queue = [np.array(x, dtype=float) for x in self.es.ask()]
        self._open = True

    def _ask(self) -> np.ndarray:
        if not self._queue:
            self._sample()
        return self._queue.pop(0)

    def _tell(self, z: np.ndarray, loss: float) -> None:
        self._buffer.append((np.clip(z, self.lower, self.upper), loss))
        if len(self._buffer) < self.popsize:
            return
        generation, self._buffer = self._buffer[:self.popsize], self._buffer[self.popsize:]
        if not self._open:  # a replay told λ points with no ask since the last generation
            self._sample()
        self.es.tell([x for x, _ in generation], [f for _, f in generation], check_points=True)
        self._open = False
        self._queue = []  # samples of the old distribution are not handed out any more
        self.generations += 1

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _rekey_archives(self.es)

    @property
    def step_size(self) -> float:
        """CMA-ES's current σ (in the units of z)."""
        return float(self.es.sigma)


def _rekey_archives(es: Any) -> None:
    """Re-key pycma's solution archives after unpickling, in this process's hash.

    pycma files each asked solution under ``hash(x.tobytes())``, and Python salts bytes hashes per
    process: in a resumed process every lookup of a pickled archive misses, the generation that
    spans the checkpoint is told as if its points were foreign, and the run leaves the path an
    uninterrupted one takes. Each archive keeps the arrays themselves, so the keys can be redone.
    """
    from cma.utilities.utils import SolutionDict

    owners = [es, *(v for v in vars(es).values() if hasattr(v, "__dict__"))]  # es and its parts hold them
    archives = {id(a): a for o in owners for a in vars(o).values() if isinstance(a, SolutionDict)}
    for archive in archives.values():
        data, same, unhashed = {}, {}, {}
        for old, value in archive.data.items():
            x = archive._unhashed_keys.get(old, old)
            key = archive.key(x)
            data[key], unhashed[key] = value, x
            if old in archive.data_with_same_key:
                same[key] = archive.data_with_same_key[old]
        archive.data, archive.data_with_same_key, archive._unhashed_keys = data, same, unhashed
