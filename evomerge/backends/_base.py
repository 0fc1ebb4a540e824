"""The backend contract: score a recipe on examples, return a `Score`, never raise.

A backend never sees the optimizer; it receives plain recipes and examples. Subclasses implement
`_evaluate`; `evaluate` turns any exception into a failed `Score`, so one bad candidate is
recorded as failed and the search goes on (mergekit-evolve's `{"score": None}` ended whole runs).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard

from evomerge.recipe import MergeRecipe
from evomerge.registry import Registry
from evomerge.score import Cost, Score, attempt
from evomerge.tasks import Example, Splits

if TYPE_CHECKING:
    from evomerge.config import SearchConfig
    from evomerge.repository import Repository

Evaluator = Callable[[MergeRecipe, str], Score]
"""What the scheduler calls: (recipe, split name) -> Score."""


class PopulationEvaluator(Protocol):
    """An evaluator that also scores several candidates of one split at once (a population forward)."""

    def __call__(self, recipe: MergeRecipe, split: str, /) -> Score: ...

    def many(self, recipes: Sequence[MergeRecipe], split: str, /) -> list[Score]: ...


def scores_many(evaluator: Evaluator) -> TypeGuard[PopulationEvaluator]:
    """Whether an executor may hand `evaluator` several candidates at once (it has a callable `many`)."""
    return callable(getattr(evaluator, "many", None))


@dataclass(frozen=True)
class Weights:
    """Where a run's weights are, for its exports and block spaces: the repository on this machine
    (None: a remote provider or a python fitness) and the layers a block space may split."""

    repository: Repository | None = None
    num_layers: int | None = None


class EvaluatorFactory(Protocol):
    """What a search needs of a backend: a picklable zero-argument callable that builds an evaluator
    where it runs (a thread, a Ray actor), and what the search reads without building one.

    A paid backend's factory also has `bound(split) -> (worst case, expected)` Costs, which the
    spend ledger reserves, and `secret_env`, the environment variables a Ray actor needs."""

    @property
    def splits(self) -> Splits | None: ...
    """The fit / validation / test examples (None: a fitness that needs none)."""

    @property
    def has_validation(self) -> bool: ...
    """Whether the returned recipe is chosen on a validation split."""

    @property
    def uses_gpu(self) -> bool: ...
    """Whether a Ray actor of it asks for a GPU where the cluster has one."""

    @property
    def weights(self) -> Weights: ...

    def fingerprint(self) -> dict[str, Any]:
        """What fixes the scores it gives (objective, examples, model-side settings), journaled so
        that a resumed run scores alike."""
        ...

    def __call__(self) -> Evaluator: ...


MEMBERS = ("splits", "has_validation", "uses_gpu", "weights", "fingerprint")


@dataclass(frozen=True)
class CustomFactory:
    """A library user's own factory (any picklable zero-argument callable building an evaluator)
    given what `EvaluatorFactory` declares, each member taken from it where it has one: the one
    place a search reads a factory by duck typing."""

    inner: Callable[[], Evaluator]

    @property
    def splits(self) -> Splits | None:
        return getattr(self.inner, "splits", None)

    @property
    def has_validation(self) -> bool:
        splits = self.splits
        return bool(getattr(self.inner, "has_validation", splits is not None and splits.validation))

    @property
    def uses_gpu(self) -> bool:
        return bool(getattr(self.inner, "uses_gpu", True))

    @property
    def weights(self) -> Weights:
        return getattr(self.inner, "weights", Weights())

    @property
    def secret_env(self) -> tuple[str, ...]:
        return tuple(getattr(self.inner, "secret_env", ()))

    def fingerprint(self) -> dict[str, Any]:
        own = getattr(self.inner, "fingerprint", None)
        return own() if callable(own) else {"backend": type(self.inner).__name__}

    def __call__(self) -> Evaluator:
        return self.inner()


class PaidCustomFactory(CustomFactory):
    """A user's factory of a paid backend: its `bound` is what the spend ledger reserves."""

    def bound(self, split: str) -> tuple[Cost, Cost]:
        return self.inner.bound(split)  # type: ignore[attr-defined]


def as_factory(factory: Any) -> EvaluatorFactory:
    """`factory` itself where it declares every member of `EvaluatorFactory`, else wrapped."""
    if all(hasattr(factory, m) for m in MEMBERS):
        return factory
    return (PaidCustomFactory if hasattr(factory, "bound") else CustomFactory)(factory)


@dataclass(frozen=True)
class Prepared:
    """A backend built from a config: the experts it offers, its evaluator factory, and what was
    paid before the journal existed (the api backend's start-up probe)."""

    experts: tuple[str, ...]
    evaluator: EvaluatorFactory
    spent: Cost = Cost()
    searched: tuple[str, ...] | None = None
    """The RegMean-aligned copies of `experts`, which the search merges beside `experts` themselves
    (`search_spaces.Portfolio`); the test table's baselines stay `experts`. None: no copies."""


class BuildsFromConfig(Protocol):
    """A registered backend: its evaluator factory built from a run's config."""

    @classmethod
    def from_config(cls, config: SearchConfig, stack: ExitStack, resume: bool = False) -> Prepared: ...


class Backend(ABC):
    """Scores recipes. Invariant: `evaluate` returns a Score for every input, failures included."""

    def evaluate(self, recipe: MergeRecipe, examples: Sequence[Example], **options: Any) -> Score:
        """Score `recipe` on `examples`; `options` are what a paid backend takes from the scheduler
        (its spend `limit`, racing's `prior`)."""
        start = time.perf_counter()
        score = attempt(self._evaluate, recipe, examples, **options)
        if score.cost.seconds == 0.0:  # a backend that does not time itself is timed here
            score = replace(score, cost=replace(score.cost, seconds=time.perf_counter() - start))
        return score

    @abstractmethod
    def _evaluate(self, recipe: MergeRecipe, examples: Sequence[Example], **options: Any) -> Score:
        """Score `recipe` on `examples`; may raise, `evaluate` records the failure."""

    def close(self) -> None:  # noqa: B027 - a no-op by default: only a backend that holds something overrides it
        """Release what the backend holds (models, connections)."""


BACKENDS: Registry[type[BuildsFromConfig]] = Registry("backend")


def register_backend(name: str) -> Callable[[type], type]:
    """Class decorator: make a backend's factory available under `name` (what users type in YAML)."""

    def deco(cls: type) -> type:
        BACKENDS.add(name, cls)
        return cls

    return deco
