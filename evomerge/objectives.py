"""What a search minimises: a metric (or a blend) per example, aggregated per task, then over tasks.

Every loss is lower-is-better: cross-entropy as is, 1 − exact match, 1 − token F1, 1 − accuracy,
1 − greedy match (whether greedy decoding would produce the answer's tokens, read off the same
teacher-forced pass as the cross-entropy: the exact-match signal without generating).
Several tasks are never pooled (a large task would drown a small one): the per-task mean losses
are combined by their mean, by their mean after dividing each by a per-task reference loss
(``normalized``, e.g. the base model's loss, so tasks of different difficulty weigh alike), or by
the worst task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from evomerge.errors import ConfigError
from evomerge.scoring import TEXT_METRICS

METRICS = ("ce", "greedy_match", "exact_match", "exact_match_ci", "f1", "accuracy")
TEXT = tuple(TEXT_METRICS)  # read off generated answers
AGGREGATES = ("mean", "normalized", "worst")


def metric_loss(metric: str, values: np.ndarray) -> np.ndarray:
    """Per-example loss of a metric's values (lower is better)."""
    values = np.asarray(values, dtype=np.float64)
    return values if metric == "ce" else 1.0 - values


@dataclass(frozen=True)
class Objective:
    """A metric or a weighted blend of metrics, and how per-task losses combine."""

    metric: str | Mapping[str, float] = "ce"
    aggregate: str = "mean"
    references: Mapping[str, float] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        weights = {self.metric: 1.0} if isinstance(self.metric, str) else dict(self.metric)
        if not weights:
            raise ConfigError("objective.metric blend is empty; give at least one of " + ", ".join(METRICS))
        for name, w in weights.items():
            if name not in METRICS:
                raise ConfigError(f"unknown objective metric {name!r}; choose from {', '.join(METRICS)}")
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise ConfigError(f"objective.metric weight of {name!r} is {w!r}; blend weights must be positive numbers")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"unknown objective aggregate {self.aggregate!r}; choose from {', '.join(AGGREGATES)}")
        if self.references is not None:
            for task, ref in self.references.items():
                if not (math.isfinite(ref) and ref > 0):
                    raise ConfigError(f"reference loss of task {task!r} is {ref}; normalising needs a positive loss")
        object.__setattr__(self, "metric", self.metric if isinstance(self.metric, str) else dict(weights))

    @classmethod
    def from_config(cls, config: Any) -> "Objective":
        """From an `evomerge.config.ObjectiveConfig` (or anything with metric and aggregate)."""
        return cls(metric=config.metric, aggregate=config.aggregate)

    @property
    def weights(self) -> dict[str, float]:
        return {self.metric: 1.0} if isinstance(self.metric, str) else dict(self.metric)

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(m for m in METRICS if m in self.weights)

    @property
    def needs_generation(self) -> bool:
        """Whether scoring needs generated text (exact match or F1), the costly part."""
        return any(m in self.weights for m in TEXT)

    @property
    def needs_references(self) -> bool:
        return self.aggregate == "normalized" and self.references is None

    def with_references(self, references: Mapping[str, float]) -> "Objective":
        return Objective(self.metric, self.aggregate, dict(references))

    def example_losses(self, per_example: Mapping[str, np.ndarray]) -> np.ndarray:
        """The blended loss of each example."""
        missing = [m for m in self.weights if m not in per_example]
        if missing:
            raise ConfigError(f"scores lack the metric(s) {missing} the objective needs")
        return sum(w * metric_loss(m, per_example[m]) for m, w in self.weights.items())

    def task_losses(self, per_example: Mapping[str, np.ndarray], tasks: Sequence[str]) -> dict[str, float]:
        """Mean blended loss per task."""
        losses = self.example_losses(per_example)
        if len(losses) != len(tasks):
            raise ConfigError(f"{len(losses)} example scores for {len(tasks)} task labels")
        if len(losses) == 0:
            raise ConfigError("no examples to score; the split is empty")
        labels = np.asarray(tasks)
        return {t: float(losses[labels == t].mean()) for t in sorted(set(tasks))}

    def loss(self, per_example: Mapping[str, np.ndarray], tasks: Sequence[str]) -> float:
        """The scalar a search minimises."""
        per_task = self.task_losses(per_example, tasks)
        if self.aggregate == "worst":
            return max(per_task.values())
        if self.aggregate == "normalized":
            if self.references is None:
                raise ConfigError("the normalized aggregate needs per-task reference losses; call with_references")
            absent = [t for t in per_task if t not in self.references]
            if absent:
                raise ConfigError(f"no reference loss for task(s) {absent}; give one per task")
            return float(np.mean([v / self.references[t] for t, v in per_task.items()]))
        return float(np.mean(list(per_task.values())))
