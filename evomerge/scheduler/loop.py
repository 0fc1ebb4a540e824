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
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field, replace

import numpy as np

from evomerge.errors import JournalError
from evomerge.journal import Journal, Trial
from evomerge.optimizers._base import Optimizer
from evomerge.recipe import MergeRecipe
from evomerge.scheduler._base import Executor
from evomerge.scheduler.ledger import Grant, Ledger
from evomerge.scheduler.race import Race
from evomerge.score import STATUS_STOPPED, Cost, Score, attempt
from evomerge.search_spaces._base import SearchSpace

STALL_LIMIT = 200
"""Consecutive cached asks after which a stage counts as converged (the optimizer only repeats)."""


@dataclass
class Shared:
    """What every stage of a run shares: executor, journal, spend ledger, the result cache.
    `paid`: the evaluator takes a spend `limit` and racing's `prior` (it has a `bound`)."""

    executor: Executor
    journal: Journal
    ledger: Ledger
    resumed: list[Trial] = field(default_factory=list)
    by_key: dict[tuple[str, str], Trial] = field(default_factory=dict)
    on_result: Callable[[Trial], None] = lambda trial: None
    paid: bool = False

    def submit(self, stage: int, trial: int, recipe: MergeRecipe, split: str,
               prior: Score | None = None) -> tuple[Future, Grant] | None:
        """Reserve the evaluation's spend (journaled) and submit it; None when the caps leave too little now."""
        grant = self.ledger.reserve(stage, trial, split)
        if grant is None:
            return None
        future = self.executor.submit(recipe, split, limit=grant.limit, prior=prior if self.paid else None)
        return future, grant

    def record(self, stage: int, trial: int, split: str, z: object, recipe: MergeRecipe, score: Score,
               objective: float, cached: bool, grant: Grant | None = None) -> Trial:
        """Journal a result, closing its reservation in the same transaction, and settle the ledger."""
        done = self.journal.record(stage, trial, split, z, recipe, score, objective, cached,
                                   None if grant is None else grant.id)
        self.ledger.settle(grant, score.cost)
        return done


@dataclass
class _Pending:
    z: np.ndarray
    recipe: MergeRecipe
    threshold: float | None = None
    """Racing's bar for this trial's minibatch objective (None: evaluate it fully at once)."""


class StageRun:
    """Runs stage `stage` of a search with exactly `budget` paid evaluations (fewer only if a
    query/token cap or convergence stops it).

    With `start`, trial 0 is the space's start point itself (then told to the optimizer like any
    result): the start is a sane merge by design (the uniform merge; a later stage's start is the
    previous stage's best, served from the cache), so it always competes in the final selection,
    and a search that only finds worse candidates returns it instead of one of them.

    Resume replays the journal into a freshly seeded optimizer: every journaled trial is asked
    again and served its journaled result, in the same order, so the optimizer reaches the state
    it had without the journal holding anything but data (no pickle of an optimizer is ever
    loaded: a journal from someone else cannot run code). Racing's minibatch results are journaled
    as their own rows, so a crash between a minibatch and its finish does not pay the minibatch again.
    """

    def __init__(self, stage: int, space: SearchSpace, budget: int, make_optimizer: Callable[[SearchSpace], Optimizer],
                 shared: Shared, lookahead: int, race: Race | None = None, race_split: str | None = None,
                 start: bool = False, told: Sequence[float] = ()) -> None:
        self.stage, self.space, self.budget, self.shared = stage, space, budget, shared
        self.race, self.race_split, self.start = race, race_split, start
        self.journaled = {t.trial: t for t in shared.resumed if t.stage == stage and t.split == "fit"}
        self.minibatches = {t.trial: t for t in shared.resumed
                            if t.stage == stage and race_split is not None and t.split == race_split}
        self.results: dict[int, Trial] = {}
        self.pending: dict[int, _Pending] = {}
        self.futures: dict[Future, tuple[int, str, Grant]] = {}
        self.waiters: dict[tuple[str, str], list[int]] = {}
        self.waiting: list[tuple[int, str, Score | None]] = []
        """Evaluations the caps could not pay for yet: (trial, split, minibatch prior), in order."""
        self.trials: list[Trial] = []
        self.opt = make_optimizer(space)
        self.k_ask = self.k_tell = self.paid = self.stalled = 0
        self.worst = -math.inf
        # Racing's bar carries over from earlier stages (`told`: same fit set, same objective), so
        # a later stage races from its first candidate instead of paying a fresh warmup in full.
        self.full_told = list(told)
        self.lookahead = max(1, lookahead)

    # -- asking ---------------------------------------------------------------------------------
    def _ask_window(self) -> None:
        """Ask until the window is full. Whether to ask never depends on the caps' state at the
        moment (a trial the caps cannot pay for yet waits), so a resumed run asks its journaled
        trials between the same tells as the run that wrote them; only once the caps can pay for
        nothing more, with nothing in flight to release, does the stage stop asking."""
        self._submit_waiting()
        while self.k_ask - self.k_tell < self.lookahead and self.paid < self.budget and self.stalled < STALL_LIMIT:
            threshold = self.race.threshold(self.full_told, self.opt.popsize) if self.race is not None else None
            split = self._split(threshold)
            replayed = self.k_ask in self.journaled or self.k_ask in self.minibatches
            if not replayed and self.shared.ledger.idle and not self.shared.ledger.affords(split):
                return
            z = self.space.x0.copy() if self.start and self.k_ask == 0 else self.opt.ask()
            self._dispatch(self.k_ask, z, threshold)
            self.k_ask += 1

    def _split(self, threshold: float | None) -> str:
        """Where a trial is scored first: racing's minibatch split where racing set it a bar, else fit."""
        if threshold is None:
            return "fit"
        assert self.race_split is not None  # a bar comes from racing, which always has its split
        return self.race_split

    def _dispatch(self, k: int, z: np.ndarray, threshold: float | None) -> None:
        """Route trial k and update the counters: a paid trial resets the stall count, one served
        without paying (journal cache hit, identical recipe) extends it."""
        paid = self._route(k, z, threshold)
        self.paid += paid
        self.stalled = 0 if paid else self.stalled + 1

    def _route(self, k: int, z: np.ndarray, threshold: float | None) -> bool:
        """Send trial k to its journaled result, a cached result, an identical one in flight, or a
        new evaluation; True when the trial is (or was, in the journal) paid for."""
        recipe = self.space.decode(z)
        self.pending[k] = _Pending(z, recipe, threshold)
        key = (recipe.key(), "fit")
        old = self.journaled.get(k) or self.minibatches.get(k)
        if old is not None and old.recipe.key() != key[0]:
            raise JournalError(f"journal trial {k} of stage {self.stage} holds a different candidate than this run "
                               "asks; it was written by another version or configuration (start a new journal)")
        done = self.journaled.get(k)
        if done is not None:
            self.results[k] = done
            self.shared.by_key.setdefault(key, done)
            return not done.cached
        hit = self.shared.by_key.get(key)
        if hit is not None:
            self._complete(k, hit.score, cached=True)
            return False
        if key in self.waiters:
            self.waiters[key].append(k)
            return False
        self.waiters[key] = [k]
        if old is not None:  # a minibatch journaled before a crash: decide on it again
            self._finish_or_stop(k, old)
        else:
            self.waiting.append((k, self._split(threshold), None))
            self._submit_waiting()
        return True

    def _submit_waiting(self) -> None:
        """Submit waiting evaluations in order while the ledger can reserve their spend."""
        while self.waiting:
            k, split, prior = self.waiting[0]
            sent = self.shared.submit(self.stage, k, self.pending[k].recipe, split, prior)
            if sent is None:
                return
            self.waiting.pop(0)
            self.futures[sent[0]] = (k, split, sent[1])

    def _abandon_waiting(self) -> None:
        """Nothing is in flight and the caps cannot pay for what waits: end those trials (a raced
        one keeps its minibatch score, stopped; a fresh one fails as over the caps)."""
        for k, _split, prior in self.waiting:
            why = "the query/token caps leave too little for this evaluation; raise --max-queries / --max-tokens"
            score = (replace(prior, status=STATUS_STOPPED, cost=Cost(), error=why) if prior is not None
                     else Score.failed(f"BudgetExhausted: {why}"))
            self._resolve(k, score)
        self.waiting = []

    # -- results --------------------------------------------------------------------------------
    def _complete(self, k: int, score: Score, cached: bool, grant: Grant | None = None) -> None:
        p = self.pending[k]
        finite = score.ok or (score.status == STATUS_STOPPED and math.isfinite(score.loss))
        objective = score.loss + self.space.penalty(p.z) if finite else math.nan
        trial = self.shared.record(self.stage, k, "fit", p.z, p.recipe, score, objective, cached, grant)
        self.shared.by_key.setdefault((p.recipe.key(), "fit"), trial)
        self.results[k] = trial
        self.shared.on_result(trial)

    def _resolve(self, k: int, score: Score, grant: Grant | None = None) -> None:
        """Record trial k's final fit score and serve every identical trial waiting on it."""
        first, *rest = self.waiters.pop((self.pending[k].recipe.key(), "fit"))
        self._complete(first, score, cached=False, grant=grant)
        for other in rest:
            self._complete(other, score, cached=True)

    def _collect(self) -> None:
        done, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
        with self.shared.journal.batch():
            for fut in sorted(done, key=lambda f: self.futures[f][0]):
                k, split, grant = self.futures.pop(fut)
                score = _result(fut)
                if split == "fit":
                    self._resolve(k, score, grant)
                    continue
                p = self.pending[k]
                mini = self.shared.record(self.stage, k, split, p.z, p.recipe, score,
                                          score.loss + self.space.penalty(p.z) if score.ok else math.nan, False, grant)
                self._finish_or_stop(k, mini)

    def _finish_or_stop(self, k: int, mini: Trial) -> None:
        """Decide a journaled minibatch: the trial stops there (its fit row costs nothing more: the
        minibatch row holds the spend), or its finish waits to be submitted with the minibatch as prior."""
        p = self.pending[k]
        if not mini.ok:
            self._resolve(k, replace(mini.score, cost=Cost()))
            return
        assert p.threshold is not None  # a minibatch is scored only for a trial racing set a bar
        if mini.loss + self.space.penalty(p.z) > p.threshold:
            self._resolve(k, replace(mini.score, status=STATUS_STOPPED, cost=Cost()))
        else:
            self.waiting.append((k, "fit", mini.score))

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
        return True

    def run(self) -> list[Trial]:
        """Evaluate until the budget is spent and every asked trial is told."""
        self._ask_window()
        while self.k_tell < self.k_ask:
            if self._tell_ready():
                continue
            self._submit_waiting()
            if not self.futures:
                if not self.waiting:
                    raise JournalError(f"stage {self.stage}: trial {self.k_tell} has no result and nothing is running")
                self._abandon_waiting()
                continue
            self._collect()
        return self.trials


def _result(fut: Future) -> Score:
    """A future's Score; an executor that broke its promise still yields a failed candidate."""
    score = attempt(fut.result)
    if isinstance(score, Score):
        return score
    return Score.failed(f"evaluator returned {type(score).__name__}, not a Score")


def evaluate_once(shared: Shared, stage: int, trials: list[tuple[int, MergeRecipe]], split: str) -> dict[int, Trial]:
    """Score fixed recipes on `split` (validation re-scoring, the test table), journaled and cached
    like search trials, each reserved on the ledger before it is sent; recipes the caps cannot pay
    for (once nothing else is in flight) are left out of the result."""
    out: dict[int, Trial] = {}
    journaled = {t.trial: t for t in shared.resumed if t.stage == stage and t.split == split}
    futures: dict[Future, tuple[Grant, list[tuple[int, MergeRecipe]]]] = {}
    submitted: dict[str, Future] = {}

    def settle(fut: Future) -> None:
        grant, group = futures.pop(fut)
        score = _result(fut)
        for i, (k, recipe) in enumerate(group):
            out[k] = shared.record(stage, k, split, (), recipe, score, score.loss, cached=i > 0,
                                   grant=grant if i == 0 else None)
            shared.by_key.setdefault((recipe.key(), split), out[k])

    for k, recipe in trials:
        key = (recipe.key(), split)
        if k in journaled:
            out[k] = shared.by_key.setdefault(key, journaled[k])
        elif key in shared.by_key:
            hit = shared.by_key[key]
            out[k] = shared.record(stage, k, split, (), recipe, hit.score, hit.score.loss, cached=True)
        elif key[0] in submitted and submitted[key[0]] in futures:
            futures[submitted[key[0]]][1].append((k, recipe))
        else:
            while (sent := shared.submit(stage, k, recipe, split)) is None and futures:
                done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                for fut in done:
                    settle(fut)
            if sent is not None:
                submitted[key[0]] = sent[0]
                futures[sent[0]] = (sent[1], [(k, recipe)])
    while futures:
        settle(next(iter(futures)))
    return out
