"""A resident model whose weights are patched in place per candidate: no disk, no reload.

The base model loads once (CUDA when available). Applying a recipe writes base + ΔW into the
touched parameters, keeping a copy of each touched tensor's base weights; tensors the previous
candidate touched and this one does not are restored. A lock serialises candidates, and
`merged(recipe)` holds it while the caller runs the model, so threads (or the provider) can share
one engine safely.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from evomerge._imports import require
from evomerge.errors import RepositoryError
from evomerge.merging.merger import Merger
from evomerge.recipe import MergeRecipe
from evomerge.repository import Repository

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU by default; on CUDA bfloat16 where the card computes it natively (compute
    capability 8.0 on), else float32 (an emulated bfloat16 is slower, and float16 may overflow)."""
    if dtype is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise RepositoryError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class MergeEngine:
    """Holds the base model and applies recipes to it in place."""

    def __init__(self, repository: Repository, device: str | None = None,
                 dtype: str | torch.dtype | None = None) -> None:
        transformers = require("transformers", "the local backend")
        self.repository = repository
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype, self.device)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(repository.base))
            model = transformers.AutoModelForCausalLM.from_pretrained(str(repository.base), dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"cannot load the base model from {repository.base}: {exc}") from None
        self.model = model.to(self.device).eval()
        self.merger = Merger(repository, self.device)
        self._params: dict[str, torch.Tensor] = {}
        for name in repository.base_files:
            try:
                self._params[name] = self.model.get_parameter(name)
            except AttributeError:
                raise RepositoryError(f"base tensor {name} is not a parameter of the loaded model; "
                                      "the checkpoint and its config.json disagree") from None
        self._base: dict[str, torch.Tensor] = {}
        self._dirty: set[str] = set()
        self._applied = ""  # "" = the base model itself
        self._lock = threading.RLock()

    @property
    def applied_key(self) -> str:
        """Key of the recipe now in the weights ("" for the base model; a failed apply restores it)."""
        return self._applied

    def _base_of(self, name: str) -> torch.Tensor:
        saved = self._base.get(name)
        if saved is None:
            saved = self._base[name] = self._params[name].detach().clone()
        return saved

    @torch.no_grad()
    def apply(self, recipe: MergeRecipe | None) -> None:
        """Make the model's weights those of `recipe` (None: the base model)."""
        key = "" if recipe is None else recipe.key()
        with self._lock:
            if key == self._applied:
                return
            touched: set[str] = set()
            try:
                if recipe is not None:
                    for name, delta in self.merger.deltas(recipe, self._base_of):
                        param = self._params[name]
                        param.copy_(delta.add_(self._base_of(name)).to(param.dtype))
                        touched.add(name)
                for name in self._dirty - touched:
                    self._params[name].copy_(self._base[name])
            except BaseException:
                for name in self._dirty | touched:
                    self._params[name].copy_(self._base[name])
                self._dirty = set()
                self._applied = ""
                raise
            self._dirty = touched
            self._applied = key

    @contextmanager
    def merged(self, recipe: MergeRecipe | None) -> Iterator[Any]:
        """Apply `recipe` and hold the engine while the caller uses ``engine.model``."""
        with self._lock:
            self.apply(recipe)
            yield self.model

    def save(self, recipe: MergeRecipe, path: str | Path) -> Path:
        """Write the merged model (safetensors + config + tokenizer) to `path`, a loadable HF directory,
        streamed from the repository tensor by tensor (the resident weights are not touched)."""
        from evomerge.merging.save import save_checkpoint

        with self._lock:
            return save_checkpoint(self.merger, recipe, path)

    def close(self) -> None:
        self.merger.close()
        self._base.clear()
        self._params.clear()
