"""The Python API: `optimize(space, evaluator, settings)`, the one search loop; `search`, its keyword
form for library users; and `run(config)`, a whole configured run (the CLI and Ray jobs).

Stages run one after another (a `Plan`); each stage is an ask/tell loop over the executor
(threads in this process, or Ray actors), journaled so that `resume=True` continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from evomerge.backends._base import EvaluatorFactory, as_factory
from evomerge.backends.python import Fitness, PythonEvaluatorFactory
from evomerge.config import SearchConfig, SearchSettings, describe_error
from evomerge.errors import ConfigError, EvomergeError
from evomerge.journal import Journal, Trial
from evomerge.optimizers import Optimizer, make_optimizer
from evomerge.recipe import MergeRecipe
from evomerge.scheduler._base import Executor
from evomerge.scheduler.ledger import Ledger
from evomerge.scheduler.loop import Shared, StageRun
from evomerge.scheduler.selection import choose, shortlist, validate
from evomerge.scheduler.threads import ThreadExecutor
from evomerge.score import Cost
from evomerge.search_spaces._base import Plan, SearchSpace, as_plan

if TYPE_CHECKING:
    from evomerge.baselines import TestReport

PROBE_STAGE = -2
"""The journal stage of spend paid outside any evaluation (the start-up probe; the test table is -1)."""

FINGERPRINT_VERSION = 2
"""Journals before it fingerprinted the evaluator by class name only (`Journal.open` compares such
a journal on the keys it has)."""


@dataclass(frozen=True)
class StageSummary:
    name: str
    budget: int
    evaluations: int
    best: Trial | None


@dataclass(frozen=True)
class SearchResult:
    """The recipe a search returns (chosen on validation where there is one) and its history."""

    best: Trial
    validation: Trial | None
    trials: tuple[Trial, ...]
    stages: tuple[StageSummary, ...]
    cost: Cost
    journal: Path | None

    @property
    def best_recipe(self) -> MergeRecipe:
        return self.best.recipe

    @property
    def best_loss(self) -> float:
        return self.best.loss

    @property
    def validation_loss(self) -> float | None:
        return None if self.validation is None else self.validation.loss

    @property
    def history(self) -> list[float]:
        """Fit loss of each trial in ask order (NaN for failures)."""
        return [t.loss for t in self.trials]


def search(fitness: Fitness | None = None, space: SearchSpace | Plan | None = None, *,
           evaluator: EvaluatorFactory | None = None, executor: str | Executor = "threads",
           journal: str | Path | None = None, resume: bool = False, force: bool = False, progress: bool = False,
           on_trial: Callable[[Trial], None] | None = None, config: Mapping[str, Any] | None = None,
           spent: Cost | None = None, **settings: Any) -> SearchResult:
    """Search `space` for the recipe of lowest loss: the keyword form of `optimize` for library users.

    Give either `fitness` (a callable: recipe -> loss or {"loss": ..., metric: ...}) or
    `evaluator` (a picklable factory of (recipe, split) -> Score, as the local and api backends
    build; with a validation split, the returned recipe is chosen on it among the `top_k` best
    by fit loss). `settings` are the fields of `SearchSettings` (budget=, seed=, optimizer=,
    race=, ...); `executor` is "threads", "ray" or an executor of your own; the rest are
    `optimize`'s.
    """
    if (fitness is None) == (evaluator is None):
        raise ConfigError("give exactly one of fitness= (a callable) or evaluator= (a backend's evaluator factory)")
    if space is None:
        raise ConfigError("give a search space (evomerge.search_spaces) or a plan")
    if isinstance(executor, str):
        settings["executor"] = executor
    try:
        validated = SearchSettings(**settings)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, "search")) from None
    factory = PythonEvaluatorFactory(fitness) if fitness is not None else as_factory(evaluator)
    return optimize(space, factory, validated, executor=None if isinstance(executor, str) else executor,
                    journal=journal, resume=resume, force=force, progress=progress, on_trial=on_trial,
                    config=config, spent=spent)


def optimize(space: SearchSpace | Plan, evaluator: EvaluatorFactory, settings: SearchSettings, *,
             executor: Executor | None = None, journal: str | Path | None = None, resume: bool = False,
             force: bool = False, progress: bool = False, config: Mapping[str, Any] | None = None,
             on_trial: Callable[[Trial], None] | None = None, spent: Cost | None = None) -> SearchResult:
    """Search `space` for the recipe of lowest loss with exactly `settings.budget` paid evaluations.

    `resume=True` continues the run journaled at `journal` (refused, unless `force`, where the
    settings' fingerprint differs). `settings.race` scores each candidate on a minibatch of the fit
    examples first and finishes only the promising ones. `settings.start` makes each stage's first
    trial its start point, so the start competes in the final selection like any candidate.
    `config`: the whole run's configuration, kept in the journal. `spent`: what was paid before the
    search began (the api backend's start-up probe), journaled as spend no evaluation closes, so the
    caps and the journal's ledger count it. `executor`: one of your own instead of `settings.executor`.
    """
    splits = evaluator.splits
    race, race_split = settings.race, None
    if race is not None:
        if splits is None or not splits.fit:
            raise ConfigError("racing needs an evaluator with fit examples (the local or api backend), "
                              "not a fitness callable")
        race_split = race.split(len(splits.fit))
    plan = as_plan(space)
    budgets = plan.budgets(settings.budget)
    options = dict(settings.optimizer_options)
    # Built before the journal exists, so a bad optimizer name or option leaves no file behind;
    # its population size sets the default lookahead.
    probe = make_optimizer(settings.optimizer, _probe_space(plan), seed=settings.seed, popsize=settings.popsize,
                           **options)
    window = settings.lookahead or max(probe.popsize, 2 * settings.workers)
    settings = settings.model_copy(update={"lookahead": window})
    fingerprint = {"version": FINGERPRINT_VERSION, "plan": plan.describe(), "evaluator": evaluator.fingerprint(),
                   **settings.fingerprint()}
    store = _open_journal(journal, fingerprint, config, resume, force)
    if spent is not None and (spent.queries or spent.tokens):
        store.reserve(PROBE_STAGE, 0, "probe", spent)
    pool = executor or _executor(settings, evaluator)
    bound = getattr(evaluator, "bound", None)
    ledger = Ledger(store, settings.max_queries, settings.max_tokens, bound)
    bar = _progress(settings.budget, store.count("fit") if resume else 0, progress)

    def on_result(trial: Trial) -> None:
        bar(trial)
        if on_trial is not None:
            on_trial(trial)

    shared = Shared(pool, store, ledger, resumed=store.trials() if resume else [], on_result=on_result,
                    paid=bound is not None)
    for t in shared.resumed:
        shared.by_key.setdefault((t.recipe.key(), t.split), t)
        if not t.cached:
            ledger.observe(t.score.cost)
    has_validation = evaluator.has_validation
    seed = settings.seed
    try:
        summaries, all_trials, validated = [], [], {}
        previous: MergeRecipe | None = None
        told: list[float] = []
        for stage, (name, stage_budget) in enumerate(zip(plan.names, budgets, strict=True)):
            if stage_budget == 0:  # a stage the plan leaves out at this budget
                continue
            stage_space = plan.space(stage, previous, stage_budget)
            make = partial(_stage_optimizer, name=settings.optimizer, options=options, seed=seed + 1000 * stage,
                           popsize=settings.popsize, budget=stage_budget)
            run = StageRun(stage, stage_space, stage_budget, make, shared, window, race, race_split, settings.start,
                           told)
            trials = run.run()
            told = run.full_told
            all_trials.extend(trials)
            top = shortlist(trials, settings.top_k)
            if has_validation and top:
                validated.update({(stage, k): v for k, v in validate(shared, stage, top).items()})
            best, _ = choose(top, validated)
            summaries.append(StageSummary(name, stage_budget, sum(1 for t in trials if not t.cached), best))
            if best is None:
                break
            previous = best.recipe
        finalists = ([t for t in all_trials if (t.stage, t.trial) in validated]
                     or shortlist(all_trials, settings.top_k))
        best, val = choose(finalists, validated)
        if best is None:
            first = next((t.score.error for t in all_trials if t.score.error), "no candidate was evaluated")
            raise EvomergeError(f"every candidate failed (first error: {first}); fix the fitness or backend and resume")
        store.set_meta("result", {"stage": best.stage, "trial": best.trial,
                                  "validation_loss": None if val is None else val.loss})
        return SearchResult(best, val, tuple(all_trials), tuple(summaries), store.totals(),
                            None if journal is None else Path(journal))
    finally:
        bar(None)
        pool.shutdown()
        store.close()


def run(config: SearchConfig, resume: bool = False, force: bool = False,
        progress: bool = True) -> tuple[SearchResult, TestReport | None]:
    """Run (or resume) the search `config` describes, the code path the CLI and Ray jobs share:
    the backend built from the config, the search, the test table of the result beside the
    baselines (where there is a test split), and the outputs."""
    from evomerge.backends import prepare
    from evomerge.baselines import run_test_table
    from evomerge.export import write_outputs
    from evomerge.search_spaces import space_from_config

    with ExitStack() as stack:
        prepared = prepare(config, stack, resume)
        factory = prepared.evaluator
        weights = factory.weights  # opens the repository: once per run
        space = (space_from_config(config.space, prepared.searched, weights.num_layers, prepared.experts)
                 if prepared.searched else space_from_config(config.space, prepared.experts, weights.num_layers))
        if factory.splits is not None:
            s = factory.splits
            print(f"searching for {', '.join(s.tasks)}: {len(s.fit)} fit, {len(s.validation)} validation, "
                  f"{len(s.test)} test examples; {len(prepared.experts)} experts", flush=True)
        result = optimize(space, factory, config, journal=config.journal, resume=resume, force=force,
                          progress=progress, config=config.model_dump(mode="json"), spent=prepared.spent)
        report = run_test_table(config, prepared, result)
        write_outputs(config, result, report, weights)
        return result, report


def _probe_space(plan: Plan) -> SearchSpace:
    """The first stage space the search's own optimizer runs (a fixed sweep stage brings its own),
    each earlier stage standing in its start point as its best: its dimension sizes the population."""
    previous: MergeRecipe | None = None
    for stage in range(len(plan.names)):
        space = plan.space(stage, previous)
        if space.optimizer is None:
            return space
        previous = space.decode(space.x0)
    return space


def _stage_optimizer(space: SearchSpace, name: str, options: Mapping[str, Any], seed: int, popsize: int | None,
                     budget: int) -> Optimizer:
    """The search's optimizer over a stage's space, or the one the space insists on (a fixed sweep)."""
    name, options = space.optimizer or (name, options)
    return make_optimizer(name, space, seed=seed, popsize=popsize, budget=budget, **options)


def _open_journal(path: str | Path | None, fingerprint: dict[str, Any], config: Mapping[str, Any] | None,
                  resume: bool, force: bool) -> Journal:
    if path is None:
        if resume:
            raise ConfigError("resume needs the journal path of the run to continue")
        return Journal.create(":memory:", fingerprint, dict(config or {}))
    if resume:
        return Journal.open(path, fingerprint, force=force)
    return Journal.create(path, fingerprint, dict(config or {}))


def _executor(settings: SearchSettings, factory: EvaluatorFactory) -> Executor:
    if settings.executor == "ray":
        from evomerge.scheduler.ray_executor import RayExecutor

        return RayExecutor(factory, settings.workers, eval_timeout=settings.eval_timeout,
                           max_retries=settings.max_retries, address=settings.ray_address)
    return ThreadExecutor(factory, settings.workers, eval_timeout=settings.eval_timeout)


def _progress(total: int, done: int, enabled: bool) -> Callable[[Trial | None], None]:
    """A tqdm bar of paid evaluations with the best fit loss; a no-op when disabled."""
    if not enabled:
        return lambda trial: None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, desc="search", unit="eval", dynamic_ncols=True)
    best = [float("inf")]

    def update(trial: Trial | None) -> None:
        if trial is None:
            bar.close()
            return
        if trial.split == "fit" and not trial.cached:
            bar.update(1)
        if trial.split == "fit" and trial.ok and trial.loss < best[0]:
            best[0] = trial.loss
            bar.set_postfix(best=f"{trial.loss:.4g}")

    return update
