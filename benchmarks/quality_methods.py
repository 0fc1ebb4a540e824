"""The methods the quality benchmark compares: searches (one budget for all) and fixed recipes.

Searching methods differ in space, optimizer, objective and selection; everything else (experts,
examples, budget, seed) comes from the benchmark. Fixed methods (uniform, the classic grids, the
best single expert) pick among a handful of recipes by their loss on the whole search set, the way
a practitioner tunes them by hand; they never see test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import evomerge
from evomerge.baselines import single
from evomerge.config import ObjectiveConfig
from evomerge.journal import Trial
from evomerge.objectives import Objective
from evomerge.recipe import MergeRecipe, uniform
from evomerge.repository import Repository
from evomerge.scheduler.race import Race
from evomerge.search_spaces import Portfolio, build_space, grid

from evomerge.merging.regmean import regmean_recipe, unalignable

from benchmarks.quality_setup import BenchFactory, Setting, aligned, search_loss

CE = Objective("ce")
ALIGNED = Objective.from_config(ObjectiveConfig())
"""evomerge's default objective (¼ CE plus 1 − exact match, each task normalised by the base model's)."""
LORAHUB_STEPS = 40


@dataclass(frozen=True)
class SearchMethod:
    """A search: space (registered name + options), optimizer, objective, and how it selects."""

    space: str
    options: dict[str, Any]
    optimizer: str = "cma"
    objective: Objective = ALIGNED
    validation: bool = True
    budget: int | None = None
    """A fixed budget of its own (LoraHub's 40 steps); None: the benchmark's budget."""
    race: bool = False
    """Score candidates on a quarter of fit first and stop the clearly worse (`evomerge.scheduler.race`)."""
    start: bool = True
    """Score the start point as trial 0 (evomerge's default); the paper and LoraHub do not."""
    align: str = "none"
    """"auto": as the CLI's `align: auto`, where it applies search the experts' RegMean-aligned copies
    and the experts as they are, half the budget each (`Portfolio`)."""


SEARCHES: dict[str, SearchMethod] = {
    # Issue 8's stage-1 comparison, all with the default objective and validation selection.
    # The task-vector form (ΔW = Σ β_i·B_i·S(A_i), linear in β): its start α=1, β=1/N is the uniform
    # merge, where the factor form's start scales each expert's own term by 1/N².
    "evo_tv_joint": SearchMethod("evo_joint", {"method": "evo_tv"}, align="auto"),
    # The default over the experts as they are (the default before 2026-12-02).
    "evo_tv_joint_unaligned": SearchMethod("evo_joint", {"method": "evo_tv"}),
    # The default without its first stage (the sweep over the uniform merge's scale): the ablation.
    "evo_tv_joint_nosweep": SearchMethod("evo_joint", {"method": "evo_tv", "scale_grid": None}),
    "evo_joint": SearchMethod("evo_joint", {"method": "evo"}),
    # The default's plan merging with TIES's trim, sign election and disjoint mean (α trims, β scales).
    "evo_ties_joint": SearchMethod("evo_joint", {"method": "evo_ties"}),
    # ... and with TSV-Merge's decorrelation: each expert's singular directions kept to its top α,
    # the concatenated singular vectors replaced by their polar factors (β scales).
    "evo_tsv_joint": SearchMethod("evo_joint", {"method": "evo_tsv"}),
    # The default without its last stage (the found merge refined per block, 2 layer groups × attn, mlp).
    "evo_tv_joint_noblocks": SearchMethod("evo_joint", {"method": "evo_tv", "refine_groups": 0}),
    # ... and with the experts that carry the merge given block multipliers of their own where the
    # block stage's budget affords them (from ~200 evaluations in all; the default shares one per block).
    "evo_tv_joint_block_experts": SearchMethod("evo_joint", {"method": "evo_tv", "block_experts": True}),
    # The default's plan under other blends: CE and 1 − exact match at equal weights (the default
    # before 2026-12-01 session 5), CE at a quarter (the default's weights, spelled out) or a tenth;
    # `ce_stop` (the answer's end scored too) instead of CE or beside it.
    "evo_tv_joint_ce_equal": SearchMethod("evo_joint", {"method": "evo_tv"},
                                          objective=Objective({"ce": 1.0, "exact_match": 1.0}, "normalized")),
    "evo_tv_joint_ce_quarter": SearchMethod("evo_joint", {"method": "evo_tv"},
                                            objective=Objective({"ce": 0.25, "exact_match": 1.0}, "normalized")),
    "evo_tv_joint_ce_tenth": SearchMethod("evo_joint", {"method": "evo_tv"},
                                          objective=Objective({"ce": 0.1, "exact_match": 1.0}, "normalized")),
    "evo_tv_joint_ce_stop": SearchMethod("evo_joint", {"method": "evo_tv"},
                                         objective=Objective({"ce_stop": 1.0, "exact_match": 1.0}, "normalized")),
    "evo_tv_joint_both_ce": SearchMethod("evo_joint", {"method": "evo_tv"},
                                         objective=Objective({"ce": 1.0, "ce_stop": 1.0, "exact_match": 1.0},
                                                             "normalized")),
    "evo_two_stage": SearchMethod("evo", {"schedule": "two_stage"}),
    "evo_two_stage_b1": SearchMethod("evo", {"schedule": "two_stage", "beta_init": "1"}),
    # CMA's first step: sigma0 = 0.05 of the box barely leaves the start within a few dozen evaluations.
    "evo_joint_wide": SearchMethod("evo_joint", {"method": "evo", "sigma0": 0.3}),
    # The paper, faithfully: two stages, CE, the lowest fit loss wins; and each stage alone.
    "paper_two_stage": SearchMethod("evo", {"schedule": "two_stage"}, objective=CE, validation=False, start=False),
    "paper_alpha_only": SearchMethod("evo", {"schedule": "alpha"}, objective=CE, validation=False, start=False),
    "paper_beta_only": SearchMethod("evo", {"schedule": "beta"}, objective=CE, validation=False, start=False),
    # LoraHub: NGOpt over signed scales only (α = 1), CE, at its own 40 steps and at the budget.
    "lorahub_40": SearchMethod("evo", {"schedule": "beta"}, "ngopt", CE, False, budget=LORAHUB_STEPS, start=False),
    "lorahub_full": SearchMethod("evo", {"schedule": "beta"}, "ngopt", CE, False, start=False),
    "random": SearchMethod("evo_joint", {"method": "evo_tv"}, "random"),
}
DEFAULT = "evo_tv_joint"
"""The proposed default search (QUALITY.md: it beat evo_joint and the paper's plan on smol in-domain)."""
FIXED = ("uniform", "task_arithmetic_grid", "ties_grid", "dare_grid", "best_single", "regmean")


@dataclass
class Outcome:
    """What a method returned and what it paid."""

    method: str
    recipe: MergeRecipe
    repository: str | None = None
    """Where the recipe's experts live when not the benchmark's zoo (their aligned copies)."""
    fit_evals: int = 0
    val_evals: int = 0
    queries: int = 0
    """Examples scored (fit and validation): the provider queries the method would pay."""
    trace: list[tuple[int, MergeRecipe]] = field(default_factory=list)
    """(paid fit evaluations, best recipe by fit loss so far) at each improvement."""
    extra: dict[str, Any] = field(default_factory=dict)


def run_search(name: str, method: SearchMethod, setting: Setting, repository: str, dtype: str | None,
               budget: int, seed: int, top_k: int, tick: Callable[[int], None]) -> Outcome:
    """Run one search and record its paid evaluations and the incumbent after each one."""
    experts, searched = setting.experts, None
    if method.align == "auto" and unalignable(Repository.open(repository), experts, setting.splits.fit) is None:
        searched, experts = aligned(repository, setting, dtype)
        repository = str(searched)
    factory = BenchFactory(repository, setting.splits, method.objective, dtype)
    if not method.validation:
        factory = factory.without_validation()
    out = Outcome(name, uniform(experts), repository=None if searched is None else repository)
    best, fit_curve = [math.inf], []

    def seen(trial: Trial) -> None:
        if trial.cached:
            return
        if trial.split != "fit":
            return
        out.fit_evals += 1
        tick(1)
        fit_curve.append((factory.meter.examples, trial.loss if trial.ok else math.inf))
        if trial.ok and trial.loss < best[0]:
            best[0] = trial.loss
            out.trace.append((out.fit_evals, trial.recipe))

    options = dict(method.options)
    if method.space == "evo_joint" or options.get("refine_groups"):  # as the CLI: the model's layers are known
        options["num_layers"] = Repository.open(repository).block_layers
    space: Any = build_space(method.space, list(experts), **options)
    if searched is not None:  # as the CLI: each family searched with half the budget, validation picks
        space = Portfolio([space, build_space(method.space, list(setting.experts), **options)])
    extra = {"race": Race()} if method.race else {}
    result = evomerge.search(space=space, evaluator=factory, budget=method.budget or budget,
                             optimizer=method.optimizer, seed=seed, top_k=top_k if method.validation else 1,
                             on_trial=seen, start=method.start, **extra)
    out.recipe = result.best_recipe
    out.queries = factory.meter.examples
    out.val_evals = factory.meter.calls.get("validation", 0)
    out.extra = {"fit_loss": result.best_loss, "validation_loss": result.validation_loss, "fit_curve": fit_curve,
                 "stages": [(s.name, s.evaluations, None if s.best is None else s.best.loss) for s in result.stages]}
    return out


def candidates(name: str, experts: Sequence[str], quick: bool) -> list[MergeRecipe]:
    """The recipes a fixed method chooses among."""
    lambdas = (0.3, 0.6, 1.0) if quick else (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    densities = (0.3, 0.7) if quick else (0.2, 0.4, 0.6, 0.8)
    if name == "uniform":
        return [uniform(experts)]
    if name == "task_arithmetic_grid":
        return grid("task_arithmetic", experts, lambdas)
    if name == "ties_grid":
        return grid("ties", experts, (0.5, 1.0) if quick else (0.5, 0.75, 1.0, 1.5), densities)
    if name == "dare_grid":
        return grid("dare", experts, lambdas, densities)
    if name == "best_single":
        return [single(e) for e in experts]
    if name == "regmean":  # the aligned copies summed at full strength: RegMean itself (experts: the copies)
        return [regmean_recipe(experts)]
    raise SystemExit(f"unknown fixed method {name!r}")


def run_fixed(name: str, setting: Setting, repository: str, dtype: str | None, quick: bool,
              tick: Callable[[int], None]) -> Outcome:
    """Score each candidate on the search set with the default objective and keep the best."""
    if name == "regmean":
        root, experts = aligned(repository, setting, dtype)
        return Outcome(name, candidates(name, experts, quick)[0], repository=str(root))
    options = candidates(name, setting.experts, quick)
    if len(options) == 1:
        return Outcome(name, options[0])
    evaluate = BenchFactory(repository, setting.splits, ALIGNED, dtype)()
    losses = []
    for recipe in options:
        losses.append(search_loss(evaluate, recipe, setting.splits))
        tick(1)
    chosen = min(range(len(options)), key=lambda i: (losses[i], i))
    size = len(setting.splits.fit) + len(setting.splits.validation)
    extra: dict[str, Any] = {"search_loss": losses[chosen]}
    if name == "best_single":
        extra["ranking"] = sorted(((r.experts[0], loss) for r, loss in zip(options, losses)), key=lambda el: el[1])
    return Outcome(name, options[chosen], fit_evals=len(options), val_evals=len(options), queries=len(options) * size,
                   extra=extra)


def base_recipe(experts: Sequence[str]) -> MergeRecipe:
    """The base model: any expert at weight 0."""
    return MergeRecipe("task_arithmetic", (experts[0],), (0.0,))
