"""The provider's `ModelHost` over the shared merging engine (`evomerge.merging`).

Every method and expert kind the local backend merges, the provider serves, with the same math.
The server wants what the engine's `apply` does not give: a merged state it can cache and
re-activate without merging again. So `merge` keeps the engine's per-tensor ΔW (in the model's
dtype) and `activate` writes base + ΔW itself, restoring tensors the previous state touched.
This host owns its engine: nothing else may call `engine.apply` on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge._imports import require
from evomerge.errors import RecipeError, RepositoryError
from evomerge.recipe import MergeRecipe
from evomerge.serve.host import Generated, Scored, TransformersRunner

State = dict[str, Any]
"""Tensor name -> ΔW (a torch tensor in the model's dtype, on its device)."""


class EngineHost:
    """A repository's base model resident with its experts; merged states are ΔW per tensor."""

    def __init__(self, repository: Any, device: str | None = None, dtype: str | None = None) -> None:
        self.torch = require("torch", "evomerge serve")
        from evomerge.merging import MergeEngine

        self.engine = MergeEngine(repository, device=device, dtype=dtype)
        self.repository = repository
        self.runner = TransformersRunner(self.engine.model, self.engine.tokenizer)
        self.tokenizer = self.engine.tokenizer
        self.base_name = "base"
        self.context_length: int | None = getattr(self.engine.model.config, "max_position_embeddings", None)
        self.experts = tuple(sorted(repository.experts))
        self._params = dict(self.engine.model.named_parameters())
        self._base: dict[str, Any] = {}
        self._dirty: set[str] = set()

    @classmethod
    def open(cls, directory: str | Path, device: str | None = None, dtype: str | None = None) -> EngineHost:
        from evomerge.repository import Repository

        return cls(Repository.open(directory), device, dtype)

    def _base_of(self, name: str) -> Any:
        if name not in self._base:
            if name not in self._params:
                raise RepositoryError(f"tensor {name} is not a parameter of the base model")
            self._base[name] = self._params[name].detach().clone()
        return self._base[name]

    def check(self, recipe: MergeRecipe) -> None:
        unknown = [e for e in recipe.experts if e not in self.repository.experts]
        if unknown:
            raise RecipeError(f"merge.experts names unknown expert(s) {unknown}; GET /v1/models lists them")

    def merge(self, recipe: MergeRecipe) -> State:
        dtype = self.engine.dtype
        return {name: delta.to(dtype) for name, delta in self.engine.merger.deltas(recipe, self._base_of)}

    def activate(self, state: State | None) -> None:
        state = state or {}
        with self.torch.no_grad():
            for name in self._dirty - state.keys():
                self._params[name].copy_(self._base[name])
            self._dirty = set()
            for name, delta in state.items():
                base = self._base_of(name)
                self._dirty.add(name)
                self._params[name].copy_(base + delta)

    def nbytes(self, state: State) -> int:
        """Memory a cached state holds (the server's LRU cache is bounded in bytes)."""
        return sum(t.numel() * t.element_size() for t in state.values())

    def score(self, texts: Sequence[str], top: int = 0, special: bool = True) -> list[Scored]:
        return self.runner.score(texts, top, special)

    def low_rank(self, recipe: MergeRecipe) -> bool:
        """Whether `recipe` can share a forward with other recipes (`score_many`)."""
        return self.engine.merger.stays_low_rank(recipe)

    def score_many(self, recipes: Sequence[MergeRecipe], texts: Sequence[Sequence[str]], top: int = 0,
                   special: bool = True) -> list[list[Scored]]:
        """`score` of each recipe's texts, every recipe in one forward pass over the base weights,
        each block of rows served by its recipe's low-rank factors (`merging.population`); blocks are
        padded to the same number of rows. Leaves the base model active."""
        from evomerge.merging import population

        self.activate(None)
        rows = max(len(t) for t in texts)
        padded = [t for block in texts for t in (list(block) + [block[0]] * (rows - len(block)))]
        engine = self.engine
        with population.serving(engine.merger, engine.model, recipes, engine.dtype, engine.device):
            scored = self.runner.score(padded, top, special)
        return [scored[c * rows : c * rows + len(block)] for c, block in enumerate(texts)]

    def generate(self, prompts: Sequence[str], max_tokens: int, temperature: float, seed: int | None,
                 special: bool = True, max_time: float | None = None) -> list[Generated]:
        return self.runner.generate(prompts, max_tokens, temperature, seed, special, max_time)

    def count_tokens(self, text: str) -> int:
        return self.runner.count_tokens(text)
