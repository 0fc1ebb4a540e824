"""Score candidates by merging in memory and running the merged model on the user's examples.

The base model stays resident (CUDA when present); each candidate is applied in place by
`evomerge.merging.MergeEngine` (no disk, no reload) and scored with the shared scorers of
`evomerge.scoring`, the same ones the provider uses, computing only the metrics the objective
needs: one teacher-forced forward pass for cross-entropy, generation only for exact match / F1.
Generation runs to `max_new_tokens` (default: `generation_length` of the examples evaluated, so the
longest answer fits; a search passes the whole task's length so every split generates alike).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from evomerge import scoring
from evomerge.backends._base import Backend, Evaluator, register_backend
from evomerge.backends.memo import ExampleMemo
from evomerge.objectives import Objective
from evomerge.recipe import MergeRecipe
from evomerge.repository import Repository
from evomerge.score import Cost, Score
from evomerge.tasks import Example, Splits, generation_length


@register_backend("local")
class LocalBackend(Backend):
    """Merges each recipe into the resident base model and scores it on examples."""

    def __init__(self, repository: Repository | str | Path, objective: Objective | None = None,
                 device: str | None = None, dtype: str | None = None, batch_size: int = 32,
                 max_new_tokens: int | None = None, chat: bool = False) -> None:
        from evomerge.merging import MergeEngine

        self.repository = repository if isinstance(repository, Repository) else Repository.open(repository)
        self.objective = objective or Objective()
        self.engine = MergeEngine(self.repository, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.chat = chat
        if chat:  # refused here, in one line, rather than by every evaluation
            scoring.model_prompt(self.engine.tokenizer, "", chat=True)
        self._references: dict[tuple[str, ...], Objective] = {}
        self.memo = ExampleMemo()

    def scores(self, recipe: MergeRecipe | None, examples: Sequence[Example],
               max_new_tokens: int | None = None) -> dict[str, np.ndarray]:
        """Per-example values of each metric the objective needs (None: the base model); generation
        runs to `max_new_tokens`, else the backend's, else the examples' `generation_length`."""
        out: dict[str, np.ndarray] = {}
        with self.engine.merged(recipe) as model:
            tok, chat = self.engine.tokenizer, self.chat
            metrics = self.objective.metrics
            if "ce" in metrics or "greedy_match" in metrics:
                ce, greedy = scoring.answer_scores(model, tok, examples, self.batch_size, chat)
                out.update({k: v for k, v in (("ce", ce), ("greedy_match", greedy)) if k in metrics})
            if "accuracy" in metrics:
                out["accuracy"] = scoring.choice_accuracy(model, tok, examples, self.batch_size, chat)
            if self.objective.needs_generation:
                length = max_new_tokens or self.max_new_tokens
                preds = scoring.generate_answers(model, tok, examples, length, self.batch_size, chat)
                out.update(scoring.text_scores(metrics, preds, examples))
        return out

    def _objective_for(self, examples: Sequence[Example], ids: tuple[str, ...], length: int) -> Objective:
        """The objective, with the base model's per-task losses on these examples as references
        when the ``normalized`` aggregate has none given."""
        if not self.objective.needs_references:
            return self.objective
        found = self._references.get(ids)
        if found is None:
            base = self.objective.task_losses(self.scores(None, examples, length), [e.task for e in examples])
            found = self._references[ids] = self.objective.with_references(base)
        return found

    def _evaluate(self, recipe: MergeRecipe, examples: Sequence[Example]) -> Score:
        start = time.perf_counter()
        ids = tuple(e.id or str(i) for i, e in enumerate(examples))
        length = self.max_new_tokens or generation_length(examples)  # all given, not the memo's missing few
        objective = self._objective_for(examples, ids, length)
        per_example = self.memo.scores((recipe.key(), self.objective.metrics), examples,
                                       lambda missing: self.scores(recipe, missing, length))
        tasks = [e.task for e in examples]
        metrics: dict[str, float] = {}
        labels = np.asarray(tasks)
        for name, values in per_example.items():
            metrics[name] = float(np.mean(values))
            for task in sorted(set(tasks)):
                metrics[f"{name}/{task}"] = float(np.mean(values[labels == task]))
        for task, loss in objective.task_losses(per_example, tasks).items():
            metrics[f"loss/{task}"] = loss
        return Score(loss=objective.loss(per_example, tasks), metrics=metrics,
                      cost=Cost(seconds=time.perf_counter() - start),
                      per_example={k: tuple(float(x) for x in v) for k, v in per_example.items()},
                      example_ids=ids)

    def close(self) -> None:
        self.engine.close()


@dataclass(frozen=True)
class _SplitEvaluator:
    backend: LocalBackend
    splits: Splits

    def __call__(self, recipe: MergeRecipe, split: str) -> Score:
        return self.backend.evaluate(recipe, self.splits.get(split))


@dataclass(frozen=True)
class LocalEvaluatorFactory:
    """Picklable recipe for a local evaluator: a worker (thread, Ray actor) builds its own model.

    ``repository_path`` is a zoo or ``base/`` + ``experts/`` directory, or, with ``expert_paths``,
    the base model directory itself.
    """

    repository_path: str | Path
    splits: Splits
    objective: Objective = Objective()
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 32
    max_new_tokens: int | None = None
    expert_paths: tuple[str | Path, ...] | None = None
    chat: bool = False

    def __call__(self) -> Evaluator:
        repo = (Repository.from_paths(self.repository_path, experts=self.expert_paths)
                if self.expert_paths else Repository.open(self.repository_path))
        backend = LocalBackend(repo, self.objective, device=self.device, dtype=self.dtype,
                               batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, chat=self.chat)
        return _SplitEvaluator(backend, self.splits)
