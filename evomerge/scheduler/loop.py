"""The search loop of one stage: asynchronous evaluation, deterministic optimizer feeding.

Feeding the optimizer (issue 5's design question): candidates are *asked ahead* up to a window
of `lookahead` asked-but-untold trials, all submitted at once, so a free worker takes the next
one without waiting for a generation; results are *told in ask order*. After each tell the loop
asks until the window is full again. The optimizer's call sequence (ask 0…L−1, tell 0, ask L,
tell 1, …) therefore depends only on the seed and the losses, never on which worker finished
first: threads and Ray give the same result, and a resumed run replays the same sequence.
A slow candidate delays the *tell* of later ones, not the workers, as long as the window holds
more candidates than there are workers.

Every result is committed to the journal before it is told (it counts only once committed);
identical recipes are served from earlier results (cache) or wait on the one in flight.
"""

from __future__ import annotations

import math
import pickle
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from evomerge.errors import JournalError
from evomerge.journal import Journal, Trial
from evomerge.optimizers._base import Optimizer
from evomerge.recipe import MergeRecipe
from evomerge.scheduler._base import Executor
from evomerge.scheduler.caps import Caps
from evomerge.scheduler.race import Race
from evomerge.score import STATUS_STOPPED, Score
from evomerge.search_spaces._base import SearchSpace

STALL_LIMIT = 200
"""Consecutive cached asks after which a stage counts as converged (the optimizer only repeats)."""


@dataclass
class Shared:
    """What every stage of a run shares: executor, journal, caps, the result cache."""

    executor: Executor
    journal: Journal
    caps: Caps
    resumed: list[Trial] = field(default_factory=list)
    by_key: dict[tuple[str, str], Trial] = field(default_factory=dict)
    on_result: Callable[[Trial], None] = lambda trial: None


@dataclass
class _Pending:
    z: np.ndarray
    recipe: MergeRecipe
    threshold: float | None = None
    """Racing's bar for this trial's minibatch objective (None: evaluate it fully at once)."""
    minibatch: Score | None = None


class StageRun:
    """Runs stage `stage` of a search with exactly `budget` paid evaluations (fewer only if a
    query/token cap or convergence stops it).

    With `start`, trial 0 is the space's start point itself (then told to the optimizer like any
    result): the start is a sane merge by design (the uniform merge; a later stage's start is the
    previous stage's best, served from the cache), so it always competes in the final selection,
    and a search that only finds worse candidates returns it instead of one of them.
    """

    def __init__(self, stage: int, space: SearchSpace, budget: int, make_optimizer: Callable[[SearchSpace], Optimizer],
                 shared: Shared, lookahead: int, checkpoint_every: int, race: Race | None = None,
                 race_split: str | None = None, start: bool = False, told: Sequence[float] = ()) -> None:
        self.stage, self.space, self.budget, self.shared = stage, space, budget, shared
        self.race, self.race_split, self.start = race, race_split, start
        self.journaled = {t.trial: t for t in shared.resumed if t.stage == stage and t.split == "fit"}
        self.results: dict[int, Trial] = {}
        self.pending: dict[int, _Pending] = {}
        self.futures: dict[Future, tuple[int, str]] = {}
        self.waiters: dict[tuple[str, str], list[int]] = {}
        self.trials: list[Trial] = []
        self.checkpoint_every = max(1, checkpoint_every)
        saved = shared.journal.latest_checkpoint(stage)
        if saved is None:
            self.opt = make_optimizer(space)
            self.k_ask = self.k_tell = self.paid = self.stalled = 0
            self.worst = -math.inf
            restored: list[tuple[int, list[float], float | None]] = []
        else:
            state = pickle.loads(saved[1])
            self.opt = state["optimizer"]
            self.k_ask, self.k_tell, self.paid = state["k_ask"], state["k_tell"], state["paid"]
            self.stalled, self.worst = state["stalled"], state["worst"]
            restored = state["pending"]
            self.trials = [t for k, t in sorted(self.journaled.items()) if k < self.k_tell]
        # Racing's bar carries over from earlier stages (`told`: same fit set, same objective), so
        # a later stage races from its first candidate instead of paying a fresh warmup in full.
        self.full_told = [*told, *(t.objective for t in self.trials if t.ok)]
        self.lookahead = max(1, lookahead)
        for k, z, threshold in restored:  # asked before the checkpoint: already counted
            self._dispatch(k, np.asarray(z, dtype=float), threshold, count=False)

    # -- asking ---------------------------------------------------------------------------------
    def _can_ask(self) -> bool:
        return (self.k_ask - self.k_tell < self.lookahead and self.paid < self.budget
                and self.stalled < STALL_LIMIT and self.shared.caps.admit(self._paid_in_flight()))

    def _paid_in_flight(self) -> int:
        return sum(1 for _, split in self.futures.values() if split == "fit")

    def _ask_window(self) -> None:
        while self._can_ask():
            threshold = self.race.threshold(self.full_told, self.opt.popsize) if self.race is not None else None
            z = self.space.x0.copy() if self.start and self.k_ask == 0 else self.opt.ask()
            self._dispatch(self.k_ask, z, threshold)
            self.k_ask += 1

    def _dispatch(self, k: int, z: np.ndarray, threshold: float | None, count: bool = True) -> None:
        """Route trial k and, with `count`, update the counters: a paid trial resets the stall
        count, one served without paying (journal cache hit, identical recipe) extends it."""
        paid = self._route(k, z, threshold)
        if count:
            self.paid += paid
            self.stalled = 0 if paid else self.stalled + 1

    def _route(self, k: int, z: np.ndarray, threshold: float | None) -> bool:
        """Send trial k to its journaled result, a cached result, an identical one in flight, or a
        new evaluation; True when the trial is (or was, in the journal) paid for."""
        recipe = self.space.decode(z)
        self.pending[k] = _Pending(z, recipe, threshold)
        key = (recipe.key(), "fit")
        old = self.journaled.get(k)
        if old is not None:
            if old.recipe.key() != key[0]:
                raise JournalError(f"journal trial {k} of stage {self.stage} holds a different candidate than this run "
                                   "asks; it was written by another version or configuration (start a new journal)")
            self.results[k] = old
            self.shared.by_key.setdefault(key, old)
            return not old.cached
        hit = self.shared.by_key.get(key)
        if hit is not None:
            self._complete(k, hit.score, cached=True)
            return False
        if key in self.waiters:
            self.waiters[key].append(k)
            return False
        self.waiters[key] = [k]
        split = self.race_split if threshold is not None else "fit"
        self.futures[self.shared.executor.submit(recipe, split)] = (k, split)
        return True

    # -- results --------------------------------------------------------------------------------
    def _complete(self, k: int, score: Score, cached: bool) -> None:
        p = self.pending[k]
        finite = score.ok or (score.status == STATUS_STOPPED and math.isfinite(score.loss))
        objective = score.loss + self.space.penalty(p.z) if finite else math.nan
        trial = self.shared.journal.record(self.stage, k, "fit", p.z, p.recipe, score, objective, cached)
        self.shared.by_key.setdefault((p.recipe.key(), "fit"), trial)
        self.results[k] = trial
        self.shared.on_result(trial)

    def _collect(self) -> None:
        done, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
        with self.shared.journal.batch():
            for fut in sorted(done, key=lambda f: self.futures[f][0]):
                k, split = self.futures.pop(fut)
                score = _result(fut)
                self.shared.caps.observe(score.cost)
                if split != "fit":
                    score = self._raced(k, score)
                    if score is None:
                        continue
                elif self.pending[k].minibatch is not None:
                    score = replace(score, cost=score.cost + self.pending[k].minibatch.cost)
                first, *rest = self.waiters.pop((self.pending[k].recipe.key(), "fit"))
                self._complete(first, score, cached=False)
                for other in rest:
                    self._complete(other, score, cached=True)

    def _raced(self, k: int, mini: Score) -> Score | None:
        """Decide a minibatch result: the final score if the trial stops here, or None once its
        full evaluation is submitted."""
        p = self.pending[k]
        if not mini.ok:
            return mini
        if mini.loss + self.space.penalty(p.z) > p.threshold:
            return replace(mini, status=STATUS_STOPPED)
        p.minibatch = mini
        self.futures[self.shared.executor.submit(p.recipe, "fit")] = (k, "fit")
        return None

    def _tell_ready(self) -> bool:
        """Tell the next result in ask order, then refill the window; False if it is not ready."""
        trial = self.results.pop(self.k_tell, None)
        if trial is None:
            return False
        if math.isfinite(trial.objective):
            told = trial.objective
            self.worst = max(self.worst, told)
            if trial.ok:
                self.full_told.append(told)
        else:  # failed: worse than anything seen, so the optimizer moves away from it
            told = self.worst + max(1.0, abs(self.worst)) if math.isfinite(self.worst) else 1e6
        self.opt.tell(self.pending.pop(self.k_tell).z, told)
        self.trials.append(trial)
        self.k_tell += 1
        self._ask_window()
        if self.k_tell % self.checkpoint_every == 0:
            self._checkpoint()
        return True

    def _checkpoint(self) -> None:
        state = {"optimizer": self.opt, "k_ask": self.k_ask, "k_tell": self.k_tell, "paid": self.paid,
                 "stalled": self.stalled, "worst": self.worst,
                 "pending": [(k, p.z.tolist(), p.threshold) for k, p in sorted(self.pending.items())]}
        self.shared.journal.save_checkpoint(self.stage, self.k_tell, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    def run(self) -> list[Trial]:
        """Evaluate until the budget is spent and every asked trial is told."""
        self._ask_window()
        while self.k_tell < self.k_ask:
            if self._tell_ready():
                continue
            if not self.futures:
                raise JournalError(f"stage {self.stage}: trial {self.k_tell} has no result and nothing is running")
            self._collect()
        return self.trials


def _result(fut: Future) -> Score:
    try:
        score = fut.result()
    except Exception as exc:  # an executor that broke its promise still yields a failed candidate
        return Score.failed(f"{type(exc).__name__}: {exc}")
    return score if isinstance(score, Score) else Score.failed(f"evaluator returned {type(score).__name__}, not a Score")


def evaluate_once(shared: Shared, stage: int, trials: list[tuple[int, MergeRecipe]], split: str) -> dict[int, Trial]:
    """Score fixed recipes on `split` (validation re-scoring), journaled and cached like search
    trials; recipes a query/token cap cannot pay for are left out of the result."""
    out: dict[int, Trial] = {}
    journaled = {t.trial: t for t in shared.resumed if t.stage == stage and t.split == split}
    futures: dict[Future, list[tuple[int, MergeRecipe]]] = {}
    submitted: dict[str, Future] = {}
    for k, recipe in trials:
        key = (recipe.key(), split)
        if k in journaled:
            out[k] = shared.by_key.setdefault(key, journaled[k])
        elif key in shared.by_key:
            hit = shared.by_key[key]
            out[k] = shared.journal.record(stage, k, split, (), recipe, hit.score, hit.score.loss, cached=True)
        elif key[0] in submitted:
            futures[submitted[key[0]]].append((k, recipe))
        elif shared.caps.admit(len(futures)):  # a capped run validates what the cap still pays for
            fut = shared.executor.submit(recipe, split)
            submitted[key[0]] = fut
            futures[fut] = [(k, recipe)]
    for fut, group in futures.items():
        score = _result(fut)
        for i, (k, recipe) in enumerate(group):
            out[k] = shared.journal.record(stage, k, split, (), recipe, score, score.loss, cached=i > 0)
            if i == 0:
                shared.caps.observe(score.cost)
                shared.by_key.setdefault((recipe.key(), split), out[k])
    return out
