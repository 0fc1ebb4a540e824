"""Many candidates in one forward pass: the base weights once, each candidate's low-rank update on its rows.

A LoRA recipe that stays low-rank changes each adapted module to W0 + B_c·A_c (`Merger.low_rank`).
With the factors of C candidates stacked (ranks padded with zeros to the largest), a batch whose
rows are laid out candidate by candidate takes x·W0ᵀ + (x·A_cᵀ)·B_cᵀ on every row of candidate c
in two batched matmuls: no ΔW is built and no weight is written, so λ candidates share the
forwards (teacher-forced and generation alike) that one-at-a-time scoring pays λ times — the
S-LoRA / Punica idea, here as forward hooks on the resident base model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from evomerge.errors import RecipeError
from evomerge.merging.merger import Merger
from evomerge.recipe import MergeRecipe

SUFFIX = ".weight"


def stacked_factors(merger: Merger, recipes: Sequence[MergeRecipe], dtype: torch.dtype,
                    device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted weight name: (A of shape (C, R, in), B of shape (C, out, R)), candidate c's
    update B[c]·A[c] the very ΔW its merge would add; a candidate that leaves a module alone (or
    has a lower rank there) has zero rows. Raises RecipeError for a recipe with no low-rank form."""
    per = [{name: (a, b) for name, b, a in merger.low_rank(recipe)} for recipe in recipes]
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in dict.fromkeys(n for factors in per for n in factors):
        shapes = [f[name] for f in per if name in f]
        rank = max(a.shape[0] for a, _ in shapes)
        n_in, n_out = shapes[0][0].shape[1], shapes[0][1].shape[0]
        a_all = torch.zeros(len(recipes), rank, n_in, dtype=dtype, device=device)
        b_all = torch.zeros(len(recipes), n_out, rank, dtype=dtype, device=device)
        for c, factors in enumerate(per):
            if name in factors:
                a, b = factors[name]
                a_all[c, : a.shape[0]] = a
                b_all[c, :, : b.shape[1]] = b
        out[name] = (a_all, b_all)
    return out


def _hook(a: torch.Tensor, b: torch.Tensor):
    """Adds candidate c's (x·A_cᵀ)·B_cᵀ to the rows of block c of a Linear's output."""
    count = a.shape[0]

    def add_update(module: Any, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if x.shape[0] % count:
            raise RecipeError(f"a population batch of {x.shape[0]} rows does not split into {count} candidates")
        blocks = x.reshape(count, -1, x.shape[-1])
        out = output.view(count, -1, output.shape[-1])  # the Linear's fresh output, added to in place
        out.baddbmm_(torch.bmm(blocks, a.transpose(1, 2)), b.transpose(1, 2))
        return output

    return add_update


def unsupported_module(model: Any, names: Sequence[str]) -> str | None:
    """Why the hooks cannot serve these adapted weights on `model` (None when every one is a
    Linear's weight): an adapter on an embedding or a fused kernel keeps one-at-a-time scoring."""
    for name in names:
        if not name.endswith(SUFFIX):
            return f"{name} is not a module's weight"
        try:
            module = model.get_submodule(name[: -len(SUFFIX)])
        except AttributeError:
            return f"{name} names no module of the model"
        if not isinstance(module, torch.nn.Linear):
            return f"{name} belongs to a {type(module).__name__}, not a Linear"
    return None


@contextmanager
def population(model: Any, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[Any]:
    """`model` (at its base weights) serving one candidate per block of rows while the block is open."""
    handles = []
    try:
        for name, (a, b) in factors.items():
            module = model.get_submodule(name[: -len(SUFFIX)])
            handles.append(module.register_forward_hook(_hook(a, b)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def serving(merger: Merger, model: Any, recipes: Sequence[MergeRecipe], dtype: torch.dtype,
            device: torch.device) -> Iterator[Any]:
    """`model` (at its base weights) serving `recipes`, one per block of rows, while the block is
    open: their factors stacked and hooked onto the adapted Linears. Raises RecipeError for a
    recipe with no low-rank form or an adapter on a module the hooks cannot serve."""
    factors = stacked_factors(merger, recipes, dtype, device)
    refusal = unsupported_module(model, list(factors))
    if refusal is not None:
        raise RecipeError(f"no population forward for these adapters: {refusal}")
    with population(model, factors):
        yield model
