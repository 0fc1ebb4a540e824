"""Evo-Merging's spaces and its two-stage plan (arXiv 2509.12951, see PAPER.md).

Per expert i: a keep ratio α_i ∈ [0, 1] (the recipe's densities) and a signed scale
β_i ∈ [-1.5, 1.5] (the recipe's weights). The paper searches α with β fixed at 1/N, then β with α
fixed at the stage-1 best, minimising the loss plus 0.05·mean|z|.

Registered names:
- ``evo``: the paper-faithful two-stage plan (α from 1 with β = 1/N, a third of the budget; then β
  from the stage-1 best, two thirds). ``schedule`` picks "alpha", "beta" or "joint" instead,
  ``beta_init="1"`` runs stage 1 with every β = 1, ``scale_grid`` adds the sweep below first.
- ``evo_joint`` (evomerge's default): a sweep of the uniform merge's strength (every β = m/N for
  m in ``scale_grid``, one evaluation each; `ScaleSpace`), each expert alone and the pairs with the
  best (`PointsSpace`), then one stage over z = [α; β] from α = 1 and the best β so far, merged in
  the task-vector form ``evo_tv`` unless ``method`` says otherwise, and where ``num_layers`` is
  given a last stage refining the found merge per block (`BlockScaleSpace`; with ``block_experts``
  the experts that carry it get multipliers of their own where the stage's budget affords them).
  Why: with a large repository, stage 1 at β = 1/N barely moves the loss (every expert's update
  is scaled by 1/N, and the LoRA-factor merge is quadratic in β, so each expert's own term is
  scaled by 1/N²), so α is chosen almost blind; searching α and β together, linear in β, lets α
  matter as soon as an expert's β grows. The sweep starts at the uniform merge (a sane model for any N, where β = 1 for
  every expert would add N full updates at once) and tries a few stronger and weaker ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from evomerge.blocks import blocks_for
from evomerge.errors import ConfigError, SearchSpaceError
from evomerge.optimizers._base import Optimizer
from evomerge.recipe import BlockOverride, MergeRecipe, methods_in
from evomerge.search_spaces._base import Plan, SearchSpace, register_space
from evomerge.search_spaces.coefficients import CoefficientSpace, Field, per_expert

ALPHA_BOUNDS = (0.0, 1.0)
BETA_BOUNDS = (-1.5, 1.5)
SEARCHES = ("alpha", "beta", "joint")
SCHEDULES = ("two_stage", *SEARCHES)
SCALE_GRID = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Multiples of the uniform merge that ``evo_joint`` tries before searching (its first stage)."""
REFINE_GROUPS = 2
"""Layer groups (× attention, MLP) of ``evo_joint``'s last stage where the model's layers are known:
on the tiny zoo's two out-of-domain targets (budget 100, 3 seeds) it added 0.05 test exact match
to both and changed nothing in domain (benchmarks/RESULTS.md)."""
BLOCKS_AFTER = 64
"""The block stage runs only when the starts leave at least this many evaluations: taking a quarter
of 24 from the joint search cost 0.15 test exact match on smol-mini (budget 40, 3 seeds); of 78–84
it added 0.05 on tiny and was level on smol-mini (budget 100)."""
EVALS_PER_DIM = 5
"""Evaluations per coordinate a block stage needs before experts get multipliers of their own
(`carried_for`): CMA-ES's population is 4 + 3·ln(dim), so this leaves it ~10 generations at the
dimensions block stages reach (24 coordinates, 120 evaluations)."""
BLOCK_GENERATIONS = 4
"""CMA-ES generations (of its default population) a block stage's budget must allow before it is
searched by the run's optimizer; a smaller stage samples the box uniformly. Why: in two generations
CMA-ES's samples stay within σ0 of the found merge, where uniform ones reach multipliers near 0 and 2
(a block's update off, or doubled). The tiny zoo's `upper_first` at budget 100 (19 block
evaluations, 4 multipliers): 0.175 -> 0.267 test exact match (3 seeds); its `final_letter` unchanged
(benchmarks/RESULTS.md). At budget 100 no block stage runs in domain (each family's half is too
small) nor with 33 experts (their starts leave under `BLOCKS_AFTER`)."""
EVO_METHODS = methods_in("evo")
"""What an evo space merges with (evo: the factor form, evo_tv: the task-vector form, evo_ties: TIES's
sign election on it, evo_tsv: TSV-Merge's decorrelated singular vectors)."""


def _beta_start(beta_init: str | float, n: int) -> float:
    if beta_init == "1/N":
        return 1.0 / n
    try:
        return float(beta_init)
    except (TypeError, ValueError):
        raise ConfigError(f"beta_init must be '1/N' or a number such as 1, got {beta_init!r}") from None


class EvoSpace(CoefficientSpace):
    """α (densities) and/or β (weights) of an evo or evo_tv recipe; unsearched ones stay fixed."""

    def __init__(self, experts: Sequence[str], search: str = "joint", *, method: str = "evo",
                 alpha: float | Sequence[float] | None = None, beta: float | Sequence[float] | None = None,
                 penalty: float = 0.05, sigma0: float = 0.05) -> None:
        if search not in SEARCHES:
            raise ConfigError(f"evo search must be one of {', '.join(SEARCHES)}, got {search!r}")
        if method not in EVO_METHODS:
            raise ConfigError(f"evo spaces merge with method {', '.join(EVO_METHODS)}, got {method!r}")
        n = len(experts)
        if n == 0:
            raise ConfigError("a search space needs at least one expert")
        fields = [
            Field("densities", *ALPHA_BOUNDS, per_expert(alpha, n, 1.0, "alpha"), search in ("alpha", "joint")),
            Field("weights", *BETA_BOUNDS, per_expert(beta, n, 1.0 / n, "beta"), search in ("beta", "joint")),
        ]
        super().__init__(method, experts, fields, penalty=penalty, sigma0=sigma0, label=f"evo_{search}")
        self.search = search


class ScaleSpace(SearchSpace):
    """One number, the β every expert shares (α = 1), swept over fixed multiples of 1/N and 1: the
    classic task-arithmetic λ sweep as a search's first stage. Why: the best strength of a merge
    depends on how many experts agree (on smol, task arithmetic's λ = 0.1 beat the uniform merge's
    1/32 by far out of domain), and a local optimizer started at 1/N spends its budget walking there.
    The strength lives in β, not in the recipe's scale, so the next stage starts at the sweep's
    best recipe itself and a provider sees an ordinary α/β query."""

    name = "evo_scale"

    def __init__(self, experts: Sequence[str], grid: Sequence[float] = SCALE_GRID, *, method: str = "evo_tv") -> None:
        self.experts = tuple(str(e) for e in experts)
        n = len(self.experts)
        if n == 0:
            raise ConfigError("a search space needs at least one expert")
        multiples = tuple(float(g) for g in grid)
        if not multiples or min(multiples) <= 0 or not min(multiples) <= 1.0 <= max(multiples) \
                or min(multiples) == max(multiples):
            raise ConfigError(f"scale_grid must hold positive multiples of 1/N around 1 (the uniform merge), "
                              f"got {list(multiples)}")
        self.method = method
        # The distinct β swept: multiples above 1.5·N cap at 1.5 and coincide. Every expert at full
        # strength is swept too: RegMean's own merge where the experts are aligned copies (on smol-mini
        # with 2 distractors it scored 0.75 test exact match where the search, whose sweep lacked it, found 0.73).
        self.betas = tuple(dict.fromkeys([*(min(BETA_BOUNDS[1], g / n) for g in multiples), 1.0]))
        self.lower, self.upper = np.array([min(self.betas)]), np.array([max(self.betas)])
        self.x0 = np.array([1.0 / n])
        if not self.lower[0] < self.upper[0]:
            raise ConfigError(f"scale_grid {list(multiples)} leaves one β for {n} experts; give smaller multiples")
        self.optimizer = ("grid", {"points": [[b] for b in self.betas]})

    def _decode(self, z: np.ndarray) -> MergeRecipe:
        n = len(self.experts)
        return MergeRecipe(self.method, self.experts, (float(z[0]),) * n, (1.0,) * n)

    def encode(self, recipe: MergeRecipe) -> np.ndarray:
        z = np.array([recipe.weights[0]]) if recipe.weights else np.zeros(1)
        if recipe.blocks or self._decode(np.clip(z, self.lower, self.upper)) != recipe:
            raise SearchSpaceError(f"the {self.name} space holds {self.method} merges of {list(self.experts)} with "
                                   "one shared β and every α = 1; this recipe is not one")
        return z

    def describe(self) -> dict[str, Any]:
        return {"space": self.name, "dim": 1, "method": self.method, "experts": list(self.experts),
                "betas": list(self.betas)}


class PointsSpace(SearchSpace):
    """Fixed β vectors (every α = 1) a stage evaluates once each: the experts alone, or the best
    so far with one more expert added at full strength. Why: a merge carried by one or two experts
    (the right expert for the task, most of the repository irrelevant) lies at distance ~1 in β from
    the uniform merge, beyond the reach of a local search that steps by σ0 = 0.05 within a user's
    budget; N evaluations see each expert alone, and N - 1 more try every pair with the best."""

    name = "evo_points"

    def __init__(self, experts: Sequence[str], points: Sequence[Sequence[float] | np.ndarray], *,
                 method: str = "evo_tv", label: str = "points") -> None:
        self.experts = tuple(str(e) for e in experts)
        n = len(self.experts)
        self.method, self.label = method, label
        self.points = [np.clip(np.asarray(p, dtype=float), *BETA_BOUNDS) for p in points]
        if not self.points or any(p.shape != (n,) for p in self.points):
            raise ConfigError(f"a points stage needs β vectors of {n} entries")
        self.lower, self.upper = np.full(n, BETA_BOUNDS[0]), np.full(n, BETA_BOUNDS[1])
        self.x0 = self.points[0].copy()
        self.optimizer = ("grid", {"points": [p.tolist() for p in self.points]})

    def _decode(self, z: np.ndarray) -> MergeRecipe:
        n = len(self.experts)
        return MergeRecipe(self.method, self.experts, tuple(float(b) for b in z), (1.0,) * n)

    def encode(self, recipe: MergeRecipe) -> np.ndarray:
        if recipe.blocks or recipe.experts != self.experts or recipe.method != self.method \
                or any(d != 1.0 for d in recipe.densities or (1.0,) * len(self.experts)):
            raise SearchSpaceError(f"the {self.name} space holds {self.method} merges of {list(self.experts)} "
                                   "with every α = 1; this recipe is not one")
        return np.array(recipe.weights, dtype=float)

    def describe(self) -> dict[str, Any]:
        return {"space": self.name, "stage": self.label, "dim": len(self.experts), "method": self.method,
                "experts": list(self.experts), "points": len(self.points)}


class BlockScaleSpace(SearchSpace):
    """Coarse-to-fine: multipliers m ∈ [0, 2] per block (layer group × module kind) on the
    previous stage's β, α kept, so in block b expert i merges with β_i·m. The `carried` experts of
    largest |β| get a multiplier of their own per block (AdaMerging's per-task, per-layer
    coefficients); the others share one per block. Why: layer-wise strength is what AdaMerging-style
    merging adds over one weight per expert, but per-expert-per-block coefficients cost experts ×
    blocks dimensions; refining the found merge along blocks costs only the blocks (a projected
    block space), and the experts that carry the merge get their own only where the stage's budget
    affords them (`carried_for`). Tensors outside every block keep the previous β; each multiplier
    stops where a β·m it scales would leave β's bounds. A stage of `budget` evaluations too few for
    `BLOCK_GENERATIONS` of CMA-ES samples the box uniformly instead."""

    name = "evo_blocks"
    sigma0 = 0.2

    def __init__(self, previous: MergeRecipe, blocks: Sequence[str], carried: int = 0,
                 budget: int | None = None) -> None:
        if not blocks:
            raise ConfigError("a block refinement needs at least one block")
        if previous.blocks:
            raise ConfigError("a block refinement starts from a recipe without block overrides")
        self.previous, self.blocks = previous, tuple(blocks)
        self.experts, self.method = previous.experts, previous.method
        self._beta = np.array(previous.weights, dtype=float)
        n = len(self._beta)
        if not 0 <= carried <= n:
            raise ConfigError(f"a block refinement carries 0 to {n} experts on their own, got {carried}")
        order = np.argsort(-np.abs(self._beta), kind="stable")
        carried = min(carried, int(np.count_nonzero(self._beta)))  # a multiplier of β = 0 would do nothing
        # Per block: one group of experts per multiplier, the shared one (if any) first.
        own = [[int(i)] for i in sorted(order[:carried])]
        rest = sorted(int(i) for i in order[carried:])
        shared = bool(rest) and (bool(np.any(self._beta[rest] != 0.0)) or not own)  # β = 0 alone: nothing to scale
        self._groups = ([rest] if shared else []) + own
        tops = []
        for group in self._groups:
            peak = float(np.abs(self._beta[group]).max())
            tops.append(2.0 if peak == 0.0 else min(2.0, BETA_BOUNDS[1] / peak))
        self.carried = carried
        self.lower = np.zeros(len(self.blocks) * len(self._groups))
        self.upper = np.tile(tops, len(self.blocks))
        self.x0 = np.ones(self.lower.size)
        if budget is not None and budget < BLOCK_GENERATIONS * Optimizer.default_popsize(self.dim):
            self.optimizer = ("random", {})

    def _decode(self, z: np.ndarray) -> MergeRecipe:
        p = self.previous
        if np.all(z == 1.0):
            return p  # the start is the previous stage's best itself, served from the cache
        blocks = tuple(BlockOverride(name, self._scaled(row), p.densities)
                       for name, row in zip(self.blocks, z.reshape(len(self.blocks), -1), strict=True))
        return MergeRecipe(p.method, p.experts, p.weights, p.densities, p.scale, blocks, p.seed)

    def _scaled(self, multipliers: np.ndarray) -> tuple[float, ...]:
        m = np.ones_like(self._beta)
        for group, g in zip(self._groups, multipliers.tolist(), strict=True):
            m[group] = g
        return tuple((m * self._beta).tolist())

    def encode(self, recipe: MergeRecipe) -> np.ndarray:
        if recipe == self.previous:
            return self.x0.copy()
        if tuple(b.name for b in recipe.blocks) == self.blocks:
            z = np.array([self._multiplier(b.weights, group) for b in recipe.blocks for group in self._groups])
            if np.all((self.lower <= z) & (z <= self.upper)) and self._decode(z) == recipe:
                return z
        raise SearchSpaceError(f"the {self.name} space holds the stage's start with its β scaled per block "
                               f"{list(self.blocks)}; this recipe is not one")

    def _multiplier(self, weights: tuple[float, ...], group: list[int]) -> float:
        """The m that scales `group`'s β to `weights` (read off its largest |β|; 1 where that is 0)."""
        j = max(group, key=lambda i: abs(self._beta[i]))
        if self._beta[j] == 0.0:
            return 1.0
        m = weights[j] / self._beta[j]  # the division may round by one ulp either way
        return next((g for g in (m, np.nextafter(m, np.inf), np.nextafter(m, -np.inf))
                     if all(g * self._beta[i] == weights[i] for i in group)), np.nan)

    def describe(self) -> dict[str, Any]:
        return {"space": self.name, "dim": self.dim, "method": self.method, "experts": list(self.experts),
                "blocks": list(self.blocks), "carried": self.carried}


def carried_for(experts: int, blocks: int, budget: int) -> int:
    """How many experts a block stage of `budget` evaluations gives multipliers of their own: the
    most that keep its dimension (blocks × multipliers per block) within `EVALS_PER_DIM` per
    coordinate; 0 (one shared multiplier per block) where even that is over."""
    for k in range(experts, 0, -1):
        if blocks * (k + (k < experts)) * EVALS_PER_DIM <= budget:
            return k
    return 0


def singles(experts: Sequence[str], previous: MergeRecipe | None, method: str) -> PointsSpace:
    """The best recipe so far (served from the cache), then each expert alone at β = 1."""
    n = len(experts)
    start = [list(previous.weights)] if previous is not None else []
    return PointsSpace(experts, start + np.eye(n).tolist(), method=method, label="singles")


def pairs(experts: Sequence[str], previous: MergeRecipe, method: str) -> PointsSpace:
    """The best recipe so far (cached), then it with each expert it leaves weak (β < 0.5) set to 1."""
    base = np.array(previous.weights, dtype=float)
    added = [np.where(np.arange(len(base)) == j, 1.0, base) for j in range(len(base)) if base[j] < 0.5]
    return PointsSpace(experts, [base] + added, method=method, label="pairs")


class EvoPlan(Plan):
    """The Evo-Merging schedule: two stages (α, then β with α fixed at the stage-1 best) or one."""

    def __init__(self, experts: Sequence[str], schedule: str = "two_stage", *, method: str = "evo",
                 beta_init: str | float = "1/N", alpha_init: float = 1.0, alpha_fraction: float = 1 / 3,
                 penalty: float = 0.05, sigma0: float = 0.05, scale_grid: Sequence[float] | None = None,
                 singles: bool = False, blocks: Sequence[str] = (), block_fraction: float = 0.25,
                 block_experts: bool = False) -> None:
        if schedule not in SCHEDULES:
            raise ConfigError(f"evo schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if not 0 < alpha_fraction < 1:
            raise ConfigError(f"alpha_fraction must lie strictly between 0 and 1, got {alpha_fraction}")
        if not 0 < block_fraction < 1:
            raise ConfigError(f"block_fraction must lie strictly between 0 and 1, got {block_fraction}")
        self.experts = tuple(experts)
        self.schedule = schedule
        self.scale_grid = None if scale_grid is None else tuple(float(g) for g in scale_grid)
        self.searches = ("alpha", "beta") if schedule == "two_stage" else (schedule,)
        # Starts before the search proper: the strength sweep, each expert alone, the pairs with the best.
        head: tuple[str, ...] = ("scale",) if self.scale_grid else ()
        head += (("singles", "pairs") if len(self.experts) > 1 else ("singles",)) if singles else ()
        self.head = head
        self.blocks, self.block_fraction, self.carry = tuple(blocks), block_fraction, block_experts
        self.names = (*head, *self.searches, *(("blocks",) if self.blocks else ()))
        self.method = method
        self.alpha_fraction = alpha_fraction
        self.beta0 = _beta_start(beta_init, len(self.experts))
        self._common: dict[str, Any] = {"method": method, "penalty": penalty, "sigma0": sigma0}
        self.alpha0 = alpha_init
        self.beta_init = beta_init
        # Validate the options now, not at stage 2.
        EvoSpace(self.experts, self.searches[0], alpha=alpha_init, beta=self.beta0, **self._common)
        self.sweep = ScaleSpace(self.experts, self.scale_grid, method=method) if self.scale_grid else None

    def budgets(self, total: int) -> list[int]:
        """The starts get one evaluation per point they try (the sweep its distinct β, singles N,
        pairs N - 1), together at most half of `total` when there are singles (each at least 1); of
        the rest, the block stage takes round(rest·block_fraction) (0 when the rest is below
        `BLOCKS_AFTER`), two stages give round(rest·alpha_fraction) to α (at least 1) and the
        remainder to β."""
        least = len(self.names) - bool(self.blocks)  # the block stage is left out (0) of a small budget
        if total < least:
            raise ConfigError(f"the {self.schedule} evo plan needs a budget of at least {least}, got {total}")
        n = len(self.experts)
        sizes = {"scale": len(self.sweep.betas) if self.sweep else 0, "singles": n, "pairs": n - 1}
        allowance = total // 2 if "singles" in self.head else total - len(self.searches) - bool(self.blocks)
        head: list[int] = []
        for i, name in enumerate(self.head):
            later = len(self.head) - i - 1  # each later start keeps at least one evaluation
            head.append(max(1, min(sizes[name], allowance - sum(head) - later)))
        rest = total - sum(head)
        tail = []
        if self.blocks:
            tail = [min(rest - len(self.searches), max(1, round(rest * self.block_fraction)))
                    if rest >= BLOCKS_AFTER else 0]
            rest -= tail[0]
        if len(self.searches) == 1:
            return [*head, rest, *tail]
        first = min(rest - 1, max(1, round(rest * self.alpha_fraction)))
        return [*head, first, rest - first, *tail]

    def space(self, index: int, previous: MergeRecipe | None, budget: int | None = None) -> SearchSpace:
        if not 0 <= index < len(self.names):
            raise ConfigError(f"the evo plan has {len(self.names)} stage(s); stage {index} does not exist")
        name = self.names[index]
        if name == "scale":
            assert self.sweep is not None  # a "scale" stage exists only with a scale_grid
            return self.sweep
        if name == "singles":
            return singles(self.experts, previous, self.method)
        if name == "pairs":
            if previous is None:
                raise ConfigError("stage 'pairs' needs stage 'singles''s best recipe")
            return pairs(self.experts, previous, self.method)
        if name == "blocks":
            if previous is None:
                raise ConfigError(f"stage 'blocks' needs stage {self.names[index - 1]!r}'s best recipe")
            carried = carried_for(len(self.experts), len(self.blocks), budget) if budget and self.carry else 0
            return BlockScaleSpace(previous, self.blocks, carried, budget)
        if index == 0:
            return EvoSpace(self.experts, name, alpha=self.alpha0, beta=self.beta0, **self._common)
        if previous is None or previous.experts != self.experts:
            raise ConfigError(f"stage {name!r} needs stage {self.names[index - 1]!r}'s best recipe (same experts)")
        if name != "beta":  # after the scale sweep: its best strength, α from the start
            return EvoSpace(self.experts, name, alpha=self.alpha0, beta=previous.weights, **self._common)
        if previous.densities is None:
            raise ConfigError("stage 'beta' needs stage 'alpha''s best recipe (with densities)")
        lo, hi = BETA_BOUNDS
        beta = [min(hi, max(lo, b)) for b in previous.weights]
        return EvoSpace(self.experts, "beta", alpha=previous.densities, beta=beta, **self._common)

    def describe(self) -> dict[str, Any]:
        return {"plan": "evo", "schedule": self.schedule, "stages": list(self.names),
                "beta_init": str(self.beta_init), "alpha_init": self.alpha0,
                "alpha_fraction": self.alpha_fraction, "scale_grid": self.scale_grid,
                "singles": "singles" in self.head, **self._common,
                **({"blocks": list(self.blocks), "block_fraction": self.block_fraction} if self.blocks else {}),
                # only where set, so the default's journals from before the option still resume
                **({"block_experts": True} if self.blocks and self.carry else {})}


def _block_options(options: dict[str, Any]) -> dict[str, Any]:
    """``refine_groups`` layer groups (× attn, mlp) over ``num_layers`` layers as the plan's blocks."""
    groups, layers = options.pop("refine_groups", 0), options.pop("num_layers", None)
    if groups:
        if layers is None:
            raise ConfigError("refine_groups needs the model's num_layers (the local backend gives it; else set "
                              "space.options.num_layers)")
        options["blocks"] = blocks_for(int(layers), int(groups))
    return options


@register_space("evo")
def evo(experts: Sequence[str], schedule: str = "two_stage", **options: Any) -> EvoPlan:
    """The paper-faithful Evo-Merging plan (two stages unless `schedule` says otherwise)."""
    return EvoPlan(experts, schedule, **_block_options(options))


@register_space("evo_joint")
def evo_joint(experts: Sequence[str], **options: Any) -> EvoPlan:
    """A sweep of the uniform merge's strength, then α and β together from its best, task-vector
    form by default (see the module docstring for why)."""
    schedule = options.pop("schedule", "joint")  # "beta": the scales alone (what llama.cpp's server can carry out)
    if options.get("num_layers") is not None:  # the model's layers are known (local backend): refine per block
        options.setdefault("refine_groups", REFINE_GROUPS)
    return EvoPlan(experts, schedule, **{"method": "evo_tv", "scale_grid": SCALE_GRID, "singles": True,
                                         **_block_options(options)})
