"""The settings of the quality benchmark and the evaluators every method shares.

A setting fixes the target tasks, the experts a method may merge and the fit / validation / test
examples, so every method sees exactly the same examples. One merge engine per process serves all
methods (loading the base model once); each method gets its own objective on top of it. The
reported numbers come from one `Scorer` that computes cross-entropy and exact match per task on
every split, whatever objective the method searched with.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evomerge.backends.local import LocalBackend, _SplitEvaluator
from evomerge.backends.memo import ExampleMemo
from evomerge.objectives import Objective
from evomerge.recipe import MergeRecipe
from evomerge.repository import Repository
from evomerge.scheduler.selection import rank_key
from evomerge.score import Score
from evomerge.tasks import Example, Splits, load_jsonl, split_search

SETTINGS = ("ood", "indomain", "indomain_distractors")
REPORT = Objective({"ce": 1.0, "exact_match": 1.0})
"""What the tables report: CE and exact match from one scoring pass (the loss is unused)."""
SPLIT_SEED = 0
"""Fixed across optimizer seeds, so every method and seed searches the same examples."""


@dataclass(frozen=True)
class Setting:
    """Target tasks, the experts to merge and the examples of one benchmark setting."""

    name: str
    tasks: tuple[str, ...]
    experts: tuple[str, ...]
    splits: Splits
    own: dict[str, str] = field(hash=False)
    """task -> its expert (in-domain references)."""

    def describe(self) -> dict[str, Any]:
        s = self.splits
        return {"tasks": list(self.tasks), "experts": len(self.experts),
                "fit": len(s.fit), "validation": len(s.validation), "test": len(s.test)}


def load_setting(repository: Path, name: str, search_per_task: int, test_per_task: int,
                 validation: float, ood_task: str | None = None) -> Setting:
    """The examples and experts of setting `name` on a zoo (`zoo.json` with tasks and ood_tasks);
    `ood_task` picks the out-of-domain target (default: the zoo's first)."""
    zoo = json.loads((repository / "zoo.json").read_text())
    experts = zoo["experts"]
    own = {spec["task"]: e for e, spec in sorted(experts.items())
           if not spec.get("distractor") and spec.get("task") in zoo["tasks"]}
    if name == "ood":
        target = ood_task or zoo["ood_tasks"][0]
        if target not in zoo["tasks"]:
            raise SystemExit(f"unknown ood task {target!r}; the zoo has {', '.join(zoo['ood_tasks'])}")
        tasks, pool = (target,), tuple(sorted(experts))
    elif name == "indomain":
        tasks, pool = tuple(sorted(own)), tuple(own[t] for t in sorted(own))
    elif name == "indomain_distractors":
        tasks, pool = tuple(sorted(own)), tuple(sorted(experts))
    else:
        raise SystemExit(f"unknown setting {name!r}; choose from {', '.join(SETTINGS)}")
    search, test = [], []
    for task in tasks:
        files = zoo["tasks"][task]
        search += load_jsonl(repository / files["search"], task=task)[:search_per_task]
        test += load_jsonl(repository / files["test"], task=task)[:test_per_task]
    fit, val = split_search(search, validation, SPLIT_SEED)
    return Setting(name, tasks, pool, Splits(_interleave(fit), val, tuple(test)), own)


def report_setting(run: dict[str, Any], result: dict[str, Any], test_per_task: int) -> Setting:
    """The setting a report's `result` ran on, for scoring its recipes on the first `test_per_task`
    test examples per task (the test split does not depend on the search examples, so few stand in)."""
    return load_setting(Path(run["repository"]), result["setting"], 2, test_per_task, 0.33,
                        result["tasks"][0] if result["setting"] == "ood" else None)


def aligned(repository: str, setting: Setting, dtype: str | None) -> tuple[Path, tuple[str, ...]]:
    """The zoo with the setting's experts RegMean-aligned on its fit split (as `align: auto` builds
    it, in the evomerge cache) and the aligned copies' names."""
    from evomerge.merging import regmean
    from evomerge.zoo import cache_dir

    root, _ = regmean.align_repository(Repository.open(repository), setting.experts, setting.splits.fit,
                                       cache_dir() / "aligned", dtype=dtype)
    return root, tuple(regmean.aligned_name(e) for e in setting.experts)


def _interleave(examples: Sequence[Example]) -> tuple[Example, ...]:
    """Round-robin over tasks, so racing's minibatch (the first K fit examples) spans every task."""
    by_task: dict[str, list[Example]] = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
    rounds = max((len(v) for v in by_task.values()), default=0)
    return tuple(group[i] for i in range(rounds) for group in by_task.values() if i < len(group))


_BACKENDS: dict[tuple[str, str | None], LocalBackend] = {}


def shared_backend(repository: str, dtype: str | None) -> LocalBackend:
    """The process's one merge engine on `repository` (loading a base model once, not per method)."""
    key = (repository, dtype)
    if key not in _BACKENDS:
        _BACKENDS[key] = LocalBackend(Repository.open(repository), REPORT, dtype=dtype)
    return _BACKENDS[key]


class Meter:
    """Examples scored through a factory's evaluators: the queries a provider would bill."""

    def __init__(self) -> None:
        self.examples = 0
        self.calls: dict[str, int] = {}


@dataclass(frozen=True)
class _Metered:
    inner: _SplitEvaluator
    meter: Meter

    def __call__(self, recipe: MergeRecipe, split: str) -> Score:
        memo = self.inner.backend.memo
        before = memo.scored
        self.meter.calls[split] = self.meter.calls.get(split, 0) + 1
        score = self.inner(recipe, split)
        self.meter.examples += memo.scored - before  # a raced finish reuses its minibatch's examples
        return score


@dataclass(frozen=True)
class BenchFactory:
    """An evaluator factory over the shared engine with a method's own objective and splits."""

    repository: str
    splits: Splits
    objective: Objective
    dtype: str | None = None
    meter: Meter = field(default_factory=Meter, compare=False)

    @property
    def has_validation(self) -> bool:
        return bool(self.splits.validation)

    def fingerprint(self) -> dict[str, Any]:
        return {"repository": self.repository, "objective": repr(self.objective), "fit": len(self.splits.fit),
                "validation": len(self.splits.validation)}

    def __call__(self) -> _Metered:
        backend = copy.copy(shared_backend(self.repository, self.dtype))
        backend.objective = self.objective
        backend._references = {}
        backend.memo = ExampleMemo()  # each method pays for its own examples
        return _Metered(_SplitEvaluator(backend, self.splits), self.meter)

    def without_validation(self) -> "BenchFactory":
        return replace(self, splits=replace(self.splits, validation=()))


@dataclass(frozen=True)
class Metrics:
    """Per-task mean exact match and CE of one recipe on one split; the headline is the mean of
    per-task exact match (tasks are never pooled)."""

    em: dict[str, float]
    ce: dict[str, float]

    @property
    def mean_em(self) -> float:
        return float(np.mean(list(self.em.values()))) if self.em else math.nan

    @property
    def mean_ce(self) -> float:
        return float(np.mean(list(self.ce.values()))) if self.ce else math.nan


class Scorer:
    """Reported metrics of recipes on any split, cached by recipe key (a recipe is scored once)."""

    def __init__(self, repository: str, setting: Setting, dtype: str | None) -> None:
        self.evaluate = BenchFactory(repository, setting.splits, REPORT, dtype)()
        self.tasks = setting.tasks
        self._cache: dict[tuple[str, str], Metrics] = {}

    def __call__(self, recipe: MergeRecipe, split: str) -> Metrics:
        key = (recipe.key(), split)
        if key not in self._cache:
            self._cache[key] = self._metrics(self.evaluate(recipe, split))
        return self._cache[key]

    def _metrics(self, score: Score) -> Metrics:
        if not score.ok:
            nan = {t: math.nan for t in self.tasks}
            return Metrics(nan, nan)
        return Metrics({t: score.metrics[f"exact_match/{t}"] for t in self.tasks},
                       {t: score.metrics[f"ce/{t}"] for t in self.tasks})


class Scorers:
    """One `Scorer` per repository a setting's recipes live in (the zoo, its experts' aligned copies)."""

    def __init__(self, setting: Setting, dtype: str | None) -> None:
        self.setting, self.dtype = setting, dtype
        self._by_repository: dict[str, Scorer] = {}

    def __call__(self, repository: str) -> Scorer:
        if repository not in self._by_repository:
            self._by_repository[repository] = Scorer(repository, self.setting, self.dtype)
        return self._by_repository[repository]


def search_loss(evaluate: Any, recipe: MergeRecipe, splits: Splits,
                parts: Sequence[str] = ("fit", "validation")) -> tuple[float, float]:
    """A method's objective on the whole search set (fit and validation, weighted by size), as
    (its rates alone, the whole blend): how a practitioner picks a grid point or a single expert
    without touching test, by the rule the searches choose by (`evomerge.scheduler.selection`)."""
    totals, n = np.zeros(2), 0
    for part in parts:
        size = len(splits.get(part))
        if size:
            score = evaluate(recipe, part)
            if not score.ok:
                return math.inf, math.inf
            totals += size * np.array(rank_key([score])(score))
            n += size
    return (float(totals[0] / n), float(totals[1] / n)) if n else (math.inf, math.inf)
