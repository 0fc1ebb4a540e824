"""Score candidates by merging in memory and running the merged model on the user's examples.

The base model stays resident (CUDA when present); each candidate is applied in place by
`evomerge.merging.MergeEngine` (no disk, no reload) and scored with the shared scorers of
`evomerge.inference`, the same ones the provider uses, computing only the metrics the objective
needs: one teacher-forced forward pass for cross-entropy, generation only for exact match / F1.
Generation runs to `max_new_tokens` (default: `generation_length` of the examples evaluated, so the
longest answer fits; a search passes the whole task's length so every split generates alike).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge import inference
from evomerge.backends._base import Backend, Evaluator, Prepared, Weights, register_backend
from evomerge.backends._config import generation_tokens, repository_dir, select_experts, splits_digest
from evomerge.backends.memo import ExampleMemo
from evomerge.objectives import Objective
from evomerge.recipe import MergeRecipe
from evomerge.repository import Repository
from evomerge.score import Cost, Score
from evomerge.tasks import Example, Splits, generation_length, load_splits

if TYPE_CHECKING:
    from evomerge.config import SearchConfig

CPU_POPULATION_COST = 0.25
"""On a CPU, where a forward is bound by multiply-adds, a recipe joins a population forward only
while its low-rank path adds at most this share of the adapted layers' work (`Merger.low_rank_cost`).
Measured on SmolLM2-135M, 12 candidates x 32 examples, other work sharing the cores: `evo` over 8
adapters (cost 0.02) ran 2.45x faster together, `evo_tv` over 8 (0.18) 3.29x, `evo_tv` over 32 (~0.6)
0.59x; on a quiet CPU `evo` is about even (0.87-1.14x), see benchmarks/RESULTS.md. A GPU, bound by
reading weights, batches every low-rank recipe."""


class LocalBackend(Backend):
    """Merges each recipe into the resident base model and scores it on examples."""

    def __init__(self, repository: Repository | str | Path, objective: Objective | None = None,
                 device: str | None = None, dtype: str | None = None, batch_size: int = 32,
                 max_new_tokens: int | None = None, chat: bool = False, population_rows: int | None = None,
                 population_cost: float | None = None) -> None:
        from evomerge.merging import MergeEngine

        self.repository = repository if isinstance(repository, Repository) else Repository.open(repository)
        self.objective = objective or Objective()
        self.engine = MergeEngine(self.repository, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.chat = chat
        self.population_rows = population_rows  # rows of one population forward (None: by memory)
        self.population_cost = population_cost if population_cost is not None else (
            math.inf if self.engine.device.type == "cuda" else CPU_POPULATION_COST)
        inference.refuse_unscorable(self.engine.tokenizer, chat, self.objective.metrics)  # here, not per evaluation
        self._references: dict[tuple[str, ...], Objective] = {}
        self.memo = ExampleMemo()

    def scores(self, recipe: MergeRecipe | None, examples: Sequence[Example],
               max_new_tokens: int | None = None) -> dict[str, np.ndarray]:
        """Per-example values of each metric the objective needs (None: the base model); generation
        runs to `max_new_tokens`, else the backend's, else the examples' `generation_length`."""
        with self.engine.merged(recipe) as model:
            return self._model_scores(model, examples, max_new_tokens or self.max_new_tokens, self.batch_size)

    def _model_scores(self, model: Any, examples: Sequence[Example], length: int | None,
                      batch_size: int) -> dict[str, np.ndarray]:
        return {**self._forward_scores(model, examples, batch_size),
                **self._generated_scores(model, examples, length, batch_size)}

    def _forward_scores(self, model: Any, examples: Sequence[Example], batch_size: int) -> dict[str, np.ndarray]:
        """The teacher-forced metrics: answer CE, greedy match, choice accuracy."""
        out: dict[str, np.ndarray] = {}
        tok, chat = self.engine.tokenizer, self.chat
        metrics = self.objective.metrics
        forced = {"ce", "ce_stop", "greedy_match"}.intersection(metrics)
        if forced:
            scores = inference.answer_scores(model, tok, examples, batch_size, chat, stop="ce_stop" in forced)
            out.update({k: getattr(scores, k) for k in forced})
        if "accuracy" in metrics:
            out["accuracy"] = inference.choice_accuracy(model, tok, examples, batch_size, chat)
        return out

    def _generated_scores(self, model: Any, examples: Sequence[Example], length: int | None,
                          batch_size: int) -> dict[str, np.ndarray]:
        """The metrics of generated answers (exact match, F1), when the objective needs them."""
        if not self.objective.needs_generation:
            return {}
        preds = inference.generate_answers(model, self.engine.tokenizer, examples, length, batch_size, self.chat)
        return inference.text_scores(self.objective.metrics, preds, examples)

    def population_scores(self, recipes: Sequence[MergeRecipe], examples: Sequence[Example],
                          length: int | None = None) -> list[dict[str, np.ndarray]]:
        """`scores` of each low-rank recipe, all scored together: the rows of one forward are the
        examples repeated candidate by candidate, each block served by its candidate's factors
        (`merging.population`). Candidates and examples split so a teacher-forced forward (whose
        logits dominate) and a generation (whose KV cache does) each stay within their memory
        budget, or within `population_rows`. Raises for a recipe with no low-rank form."""
        from evomerge.merging import population

        length = length or self.max_new_tokens or generation_length(examples)
        forward_rows, generate_rows = ((self.population_rows,) * 2 if self.population_rows
                                       else self._rows_for_memory(examples, length))
        per_example = max((len(e.choices) for e in examples if e.choices), default=1) \
            if "accuracy" in self.objective.metrics else 1
        group = max(1, min(len(recipes), max(forward_rows // per_example, generate_rows)))
        out: list[dict[str, list[np.ndarray]]] = [{} for _ in recipes]
        with self.engine.merged(None) as model:
            for g in range(0, len(recipes), group):
                members = recipes[g : g + group]
                n = len(members)
                passes = ((lambda part: self._forward_scores(model, part, len(part) * per_example),
                           max(1, forward_rows // (n * per_example))),
                          (lambda part: self._generated_scores(model, part, length, len(part)),
                           max(1, generate_rows // n)))
                with population.serving(self.engine.merger, model, members, self.engine.dtype, self.engine.device):
                    for run, chunk in passes:
                        for e0 in range(0, len(examples), chunk):
                            part = list(examples[e0 : e0 + chunk])
                            for name, v in run(part * n).items():
                                for c in range(n):
                                    out[g + c].setdefault(name, []).append(v[c * len(part) : (c + 1) * len(part)])
        return [{name: np.concatenate(parts) for name, parts in o.items()} for o in out]

    def _rows_for_memory(self, examples: Sequence[Example], length: int) -> tuple[int, int]:
        """Rows one population forward may take (teacher-forced, then generation): a quarter of free
        accelerator memory (1 GiB on a CPU) over a row's logits and activations, or its KV cache and
        activations, at the longest example's length; each at least `batch_size`."""
        import torch

        config = self.engine.model.config
        tokens = max(len(e.prompt) + len(e.answer) for e in examples) + length  # bytes bound tokens
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        kv = 2 * config.num_hidden_layers * heads * (config.hidden_size // config.num_attention_heads)
        on_gpu = self.engine.device.type == "cuda"
        budget = torch.cuda.mem_get_info(self.engine.device)[0] // 4 if on_gpu else 1 << 30
        forward = tokens * (config.vocab_size + 16 * config.hidden_size) * 4
        generate = tokens * (kv + 16 * config.hidden_size) * 4 + 2 * config.vocab_size * 4
        return max(self.batch_size, budget // forward), max(self.batch_size, budget // generate)

    def evaluate_many(self, recipes: Sequence[MergeRecipe], examples: Sequence[Example]) -> list[Score]:
        """`evaluate` of every recipe: those that stay low-rank scored together in batched forwards
        (`population_scores`), the rest (TIES, DARE, full experts) one at a time. Equal to
        `evaluate` per recipe within float rounding; if the batch fails, its recipes are scored one
        at a time, so one bad recipe fails alone."""
        batched = [i for i, r in enumerate(recipes) if self._low_rank(r)]
        scores: dict[int, Score] = {}
        if len(batched) > 1:
            start = time.perf_counter()
            try:
                ids = tuple(e.id or str(i) for i, e in enumerate(examples))
                length = self.max_new_tokens or generation_length(examples)
                objective = self._objective_for(examples, ids, length)
                unique = list(dict.fromkeys(examples))
                values = self.population_scores([recipes[i] for i in batched], unique, length)
            except Exception:  # one bad recipe (or memory) must not fail the others: score them alone
                values = None
            if values is not None:
                seconds = (time.perf_counter() - start) / len(batched)
                at = {e: j for j, e in enumerate(unique)}
                for i, v in zip(batched, values, strict=True):
                    per_example = self.memo.scores((recipes[i].key(), self.objective.metrics), examples,
                                                   partial(_rows, v, at))
                    scores[i] = objective.score(per_example, examples, ids, Cost(seconds=seconds))
        return [scores[i] if i in scores else self.evaluate(r, examples) for i, r in enumerate(recipes)]

    def _low_rank(self, recipe: MergeRecipe) -> bool:
        """Whether `recipe` joins a population forward: low-rank, and cheap enough beside the base."""
        return self.engine.merger.stays_low_rank(recipe, self.population_cost)

    def _objective_for(self, examples: Sequence[Example], ids: tuple[str, ...], length: int) -> Objective:
        """The objective, with the base model's per-task losses on these examples as references
        when the ``normalized`` aggregate has none given."""
        if not self.objective.needs_references:
            return self.objective
        found = self._references.get(ids)
        if found is None:
            base = self.objective.reference_losses(self.scores(None, examples, length), [e.task for e in examples])
            found = self._references[ids] = self.objective.with_references(base)
        return found

    def _evaluate(self, recipe: MergeRecipe, examples: Sequence[Example], **options: Any) -> Score:
        """`options` (a spend limit, a racing prior) are for paid backends: a local forward costs nothing."""
        start = time.perf_counter()
        ids = tuple(e.id or str(i) for i, e in enumerate(examples))
        length = self.max_new_tokens or generation_length(examples)  # all given, not the memo's missing few
        objective = self._objective_for(examples, ids, length)
        per_example = self.memo.scores((recipe.key(), self.objective.metrics), examples,
                                       lambda missing: self.scores(recipe, missing, length))
        return objective.score(per_example, examples, ids, Cost(seconds=time.perf_counter() - start))

    def close(self) -> None:
        self.engine.close()


def _rows(values: dict[str, np.ndarray], at: dict[Example, int], missing: list[Example]) -> dict[str, np.ndarray]:
    """The rows of a population forward's `values` (one per example in `at`) for `missing`."""
    return {k: x[[at[e] for e in missing]] for k, x in values.items()}


@dataclass(frozen=True)
class _SplitEvaluator:
    backend: LocalBackend
    splits: Splits

    def __call__(self, recipe: MergeRecipe, split: str) -> Score:
        return self.backend.evaluate(recipe, self.splits.get(split))


class _PopulationEvaluator(_SplitEvaluator):
    """An evaluator an executor may hand several candidates at once (`many`)."""

    def many(self, recipes: Sequence[MergeRecipe], split: str) -> list[Score]:
        return self.backend.evaluate_many(recipes, self.splits.get(split))


@register_backend("local")
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
    population: bool = True
    population_cost: float | None = None
    aligned: bool = False
    """The repository holds RegMean-aligned copies of the experts, which the search merges."""
    uses_gpu = True

    @classmethod
    def from_config(cls, config: SearchConfig, stack: ExitStack, resume: bool = False) -> Prepared:
        """The configured repository (default: the tiny demo zoo) merged and scored in this process."""
        source = repository_dir(config)
        repo = Repository.open(source)
        splits = load_splits(config.task, repo)
        experts = select_experts(config.experts, list(repo.experts))
        objective = Objective.from_config(config.objective)
        if config.task.chat or "ce_stop" in objective.metrics:  # refused now in one line, not by every evaluator
            from evomerge._imports import require

            tokenizer = require("transformers", "the local backend").AutoTokenizer.from_pretrained(str(repo.base))
            inference.refuse_unscorable(tokenizer, config.task.chat, objective.metrics)
        root, searched = searched_repository(config, source, repo, experts, splits)
        batch: dict[str, Any] = {} if config.batch_size is None else {"batch_size": config.batch_size}
        factory = cls(str(root), splits, objective, device=config.device,
                      dtype=config.dtype, max_new_tokens=generation_tokens(config, splits), chat=config.task.chat,
                      population=config.population, aligned=searched is not None, **batch)
        return Prepared(experts, factory, searched=searched)

    @property
    def has_validation(self) -> bool:
        return bool(self.splits.validation)

    @property
    def weights(self) -> Weights:
        repo = self._repository()
        return Weights(repo, repo.block_layers)

    def fingerprint(self) -> dict[str, Any]:
        return {"backend": "local", "objective": repr(self.objective), "examples": splits_digest(self.splits),
                "max_new_tokens": self.max_new_tokens, "chat": self.chat, "dtype": self.dtype,
                **({"aligned": "regmean"} if self.aligned else {})}

    def _repository(self) -> Repository:
        return (Repository.from_paths(self.repository_path, experts=self.expert_paths)
                if self.expert_paths else Repository.open(self.repository_path))

    def __call__(self) -> Evaluator:
        backend = LocalBackend(self._repository(), self.objective, device=self.device, dtype=self.dtype,
                               batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, chat=self.chat,
                               population_cost=self.population_cost)
        return (_PopulationEvaluator if self.population else _SplitEvaluator)(backend, self.splits)


def searched_repository(config: SearchConfig, root: Path, repo: Repository, experts: Sequence[str],
                        splits: Splits) -> tuple[Path, tuple[str, ...] | None]:
    """The repository a local search merges from and, where `config.align` aligns them, the names
    of the experts' aligned copies, which it holds beside the experts (built once per experts and
    fit examples, in the evomerge cache; the same call finds them again on resume and export).
    `repo` is the one opened at `root`."""
    from evomerge.errors import ConfigError
    from evomerge.merging import regmean
    from evomerge.zoo import cache_dir

    if config.align == "none":
        return root, None
    why = regmean.unalignable(repo, experts, splits.fit)
    if why is not None:
        if config.align == "regmean":
            raise ConfigError(f"align: regmean cannot apply: {why}; set align: none")
        return root, None
    aligned, serves = regmean.align_repository(repo, experts, splits.fit, cache_dir() / "aligned", config.device,
                                               config.dtype, config.task.chat, config.batch_size or 32)
    print(f"RegMean-aligned {len(experts)} experts to {len(serves)} tasks (" +
          ", ".join(f"{t}: {e}" for t, e in sorted(serves.items())) + f") in {aligned}; searching them beside the "
          "experts as they are",
          flush=True)
    return aligned, tuple(regmean.aligned_name(e) for e in experts)
