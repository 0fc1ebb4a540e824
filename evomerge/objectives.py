"""What a search minimises: a metric (or a blend) per example, aggregated per task, then over tasks.

Every loss is lower-is-better: cross-entropy as is, 1 − exact match, 1 − token F1, 1 − accuracy,
1 − greedy match (whether greedy decoding would produce the answer's tokens, read off the same
teacher-forced pass as the cross-entropy: the exact-match signal without generating).
``ce_stop`` is the cross-entropy of the answer and then its end (EOS or a newline) as one more
token, from the same pass: what training teaches, and what exact match needs, since a model that
knows the answer but runs on past it scores 0 there while its answer CE is low (the tiny zoo's
``first_letter``: base CE 0.18, exact match 0).
Several tasks are never pooled (a large task would drown a small one): the per-task mean losses
are combined by their mean, by their mean after dividing each metric's loss by a per-task reference
(``normalized``, e.g. the base model's loss on that metric, so tasks of different difficulty and
metrics of different units weigh alike), or by the worst task. Why per metric: a blend of CE (nats,
unbounded) and 1 − exact match divided as one sum lets a fraction of a nat outweigh half the answers
turning right (measured on the tiny zoo's ``upper_first``: 0.44 exact match lost to 0 for 0.47 nats).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.inference import TEXT_METRICS
from evomerge.score import Cost, Score
from evomerge.tasks import Example

METRICS = ("ce", "ce_stop", "greedy_match", "exact_match", "exact_match_ci", "f1", "accuracy")
TEXT = tuple(TEXT_METRICS)  # read off generated answers
AGGREGATES = ("mean", "normalized", "worst")
CROSS_ENTROPIES = ("ce", "ce_stop")  # losses as they are; every other metric is a rate
SELECTION = "loss_rates"
"""The metrics key of a blend's loss on its rates alone (its cross-entropies left out): what the
returned recipe is chosen on first (`evomerge.scheduler.selection`)."""


def metric_loss(metric: str, values: np.ndarray) -> np.ndarray:
    """Per-example loss of a metric's values (lower is better)."""
    values = np.asarray(values, dtype=np.float64)
    return values if metric in CROSS_ENTROPIES else 1.0 - values


def _per_metric(references: Mapping[str, float | Mapping[str, float]],
                metrics: Iterable[str]) -> dict[str, dict[str, float]]:
    """Reference losses per task and metric; a task's single number stands for every metric."""
    return {task: dict(ref) if isinstance(ref, Mapping) else dict.fromkeys(metrics, ref)
            for task, ref in references.items()}


@dataclass(frozen=True)
class Objective:
    """A metric or a weighted blend of metrics, and how per-task losses combine."""

    metric: str | Mapping[str, float] = "ce"
    aggregate: str = "mean"
    references: Mapping[str, Mapping[str, float]] | None = field(default=None, hash=False)
    """Per task, per metric: the loss that metric's loss is divided by (``normalized``)."""

    def __post_init__(self) -> None:
        weights = {self.metric: 1.0} if isinstance(self.metric, str) else dict(self.metric)
        if not weights:
            raise ConfigError("objective.metric blend is empty; give at least one of " + ", ".join(METRICS))
        for name, w in weights.items():
            if name not in METRICS:
                raise ConfigError(f"unknown objective metric {name!r}; choose from {', '.join(METRICS)}")
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise ConfigError(f"objective.metric weight of {name!r} is {w!r}; "
                                  "blend weights must be positive numbers")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"unknown objective aggregate {self.aggregate!r}; choose from {', '.join(AGGREGATES)}")
        if self.references is not None:
            refs = _per_metric(self.references, weights)
            for task, ref in refs.items():
                for name, value in ref.items():
                    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                        raise ConfigError(f"reference loss of task {task!r} ({name}) is {value}; normalising needs "
                                          "a positive loss")
            object.__setattr__(self, "references", refs)
        object.__setattr__(self, "metric", self.metric if isinstance(self.metric, str) else dict(weights))

    @classmethod
    def from_config(cls, config: Any) -> Objective:
        """From an `evomerge.config.ObjectiveConfig` (or anything with metric and aggregate)."""
        return cls(metric=config.metric, aggregate=config.aggregate)

    @property
    def weights(self) -> dict[str, float]:
        return {self.metric: 1.0} if isinstance(self.metric, str) else dict(self.metric)

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(m for m in METRICS if m in self.weights)

    @property
    def rates(self) -> Objective | None:
        """The objective less its cross-entropies, where it blends both (else None): the part users
        read. CE guides the search where exact match is flat, but a merge of lower CE and fewer
        right answers must not be returned over one with more (the tiny zoo in domain: an aligned
        merge at 0.05 exact match chosen over ``first_letter`` alone at 0.20 by its CE)."""
        kept = {m: w for m, w in self.weights.items() if m not in CROSS_ENTROPIES}
        if not kept or len(kept) == len(self.weights):
            return None
        return Objective(kept, self.aggregate, self.references)

    @property
    def needs_generation(self) -> bool:
        """Whether scoring needs generated text (exact match or F1), the costly part."""
        return any(m in self.weights for m in TEXT)

    @property
    def needs_references(self) -> bool:
        return self.aggregate == "normalized" and self.references is None

    def with_references(self, references: Mapping[str, float | Mapping[str, float]]) -> Objective:
        """With reference losses per task: one number for every metric, or one per metric."""
        return Objective(self.metric, self.aggregate, _per_metric(references, self.weights))

    def metric_losses(self, per_example: Mapping[str, np.ndarray], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
        """Mean loss of each of the objective's metrics, per task."""
        missing = [m for m in self.weights if m not in per_example]
        if missing:
            raise ConfigError(f"scores lack the metric(s) {missing} the objective needs")
        if len(tasks) == 0:
            raise ConfigError("no examples to score; the split is empty")
        if any(len(per_example[m]) != len(tasks) for m in self.weights):
            n = len(per_example[next(iter(self.weights))])
            raise ConfigError(f"{n} example scores for {len(tasks)} task labels")
        labels = np.asarray(tasks)
        return {t: {m: float(metric_loss(m, per_example[m])[labels == t].mean()) for m in self.weights}
                for t in sorted(set(tasks))}

    def reference_losses(self, per_example: Mapping[str, np.ndarray],
                         tasks: Sequence[str]) -> dict[str, dict[str, float]]:
        """`metric_losses` of a reference model (the base), each kept above what one example can
        measure (1/n of a task's n examples; CE 1e-3), so a metric the base already gets right
        still divides by a positive number."""
        counts = {t: list(tasks).count(t) for t in set(tasks)}
        return {t: {m: max(v, 1e-3 if m in CROSS_ENTROPIES else 1.0 / counts[t]) for m, v in per.items()}
                for t, per in self.metric_losses(per_example, tasks).items()}

    def task_losses(self, per_example: Mapping[str, np.ndarray], tasks: Sequence[str]) -> dict[str, float]:
        """Mean blended loss per task (before any normalising)."""
        return {t: sum(w * per[m] for m, w in self.weights.items())
                for t, per in self.metric_losses(per_example, tasks).items()}

    def score(self, per_example: Mapping[str, np.ndarray], examples: Sequence[Example], ids: tuple[str, ...],
              cost: Cost) -> Score:
        """The Score of per-example metric values, alike in every backend: the loss, each metric's
        mean overall and per task, and each task's loss."""
        tasks = [e.task for e in examples]
        labels = np.asarray(tasks)
        metrics: dict[str, float] = {}
        for name, values in per_example.items():
            metrics[name] = float(np.mean(values))
            for task in sorted(set(tasks)):
                metrics[f"{name}/{task}"] = float(np.mean(values[labels == task]))
        for task, loss in self.task_losses(per_example, tasks).items():
            metrics[f"loss/{task}"] = loss
        rates = self.rates
        if rates is not None:
            metrics[SELECTION] = rates.loss(per_example, tasks)
        return Score(loss=self.loss(per_example, tasks), metrics=metrics, cost=cost,
                     per_example={k: tuple(float(x) for x in v) for k, v in per_example.items()}, example_ids=ids)

    def loss(self, per_example: Mapping[str, np.ndarray], tasks: Sequence[str]) -> float:
        """The scalar a search minimises."""
        if self.aggregate == "normalized":
            per_metric = self.metric_losses(per_example, tasks)
            if self.references is None:
                raise ConfigError("the normalized aggregate needs per-task reference losses; call with_references")
            absent = [t for t in per_metric if t not in self.references]
            if absent:
                raise ConfigError(f"no reference loss for task(s) {absent}; give one per task")
            refs, total = self.references, sum(self.weights.values())  # the base scores 1
            return float(np.mean([sum(self.weights[m] * v / refs[t][m] for m, v in per.items()) / total
                                  for t, per in per_metric.items()]))
        per_task = list(self.task_losses(per_example, tasks).values())
        return max(per_task) if self.aggregate == "worst" else float(np.mean(per_task))
