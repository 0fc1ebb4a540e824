"""Merge kernels: small registered functions over one tensor's task vectors.

A recipe's method (`evomerge.recipe.MergeMethod`) names its kernel here: linear and uniform share
task arithmetic's (with their effective weights), evo_tv evo's. Each kernel receives, for one
tensor, one `Contribution` per expert (its weight, its density and a thunk producing its task
vector τ_i = θ_i − θ_0 in float32) and returns the merged delta. Task vectors are produced on
demand and dropped after use, so memory holds a few tensors of one shape whatever the number of
experts. Merges of LoRA factors (low-rank methods) live in `lora.py`.
Semantics follow mergekit's where both have the method (weights multiply trimmed deltas before
the sign election; the disjoint mean divides by the sum of agreeing weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from evomerge.errors import RecipeError
from evomerge.merging.lora import decorrelate
from evomerge.merging.sparsify import dare, keep_count, mask_from, prune, select
from evomerge.registry import Registry

TIES_CACHE_BYTES = 256 << 20
"""TIES keeps trimmed deltas between its two passes while they fit in this; else it recomputes."""


@dataclass(frozen=True)
class Contribution:
    """One expert's share of one tensor: coefficients plus its task vector, computed on demand."""

    expert: str
    weight: float
    density: float | None
    delta: Callable[[], torch.Tensor]  # returns a fresh tensor the method may modify in place


Kernel = Callable[[Sequence[Contribution], str, "int | None"], torch.Tensor]
KERNELS: Registry[Kernel] = Registry("merge kernel", error=RecipeError)
"""Task-vector merges by the name a `MergeMethod.kernel` gives."""


def _density(c: Contribution) -> float:
    return 1.0 if c.density is None else c.density


def _weighted_sum(contribs: Sequence[Contribution],
                  transform: Callable[[Contribution, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    total: torch.Tensor | None = None
    for c in contribs:
        w = c.weight
        if w == 0.0:
            continue
        term = transform(c, c.delta()).mul_(w)
        total = term if total is None else total.add_(term)
    if total is None:
        total = torch.zeros_like(contribs[0].delta())
    return total


@KERNELS.register("task_arithmetic")
def task_arithmetic(contribs: Sequence[Contribution], tensor: str, seed: int | None) -> torch.Tensor:
    """Σ w_i·τ_i."""
    return _weighted_sum(contribs, lambda c, d: d)



@KERNELS.register("evo")
def evo(contribs: Sequence[Contribution], tensor: str, seed: int | None) -> torch.Tensor:
    """Σ β_i·S_{α_i}(τ_i): Evo-Merging on full checkpoints (α prunes τ_i, β scales it)."""
    return _weighted_sum(contribs, lambda c, d: prune(d, _density(c), "round"))



@KERNELS.register("dare")
def dare_merge(contribs: Sequence[Contribution], tensor: str, seed: int | None) -> torch.Tensor:
    """Σ w_i·DARE(τ_i): seeded random drop, survivors rescaled by 1/density."""
    return _weighted_sum(contribs, lambda c, d: dare(d, _density(c), seed, c.expert, tensor))


@KERNELS.register("ties")
def ties(contribs: Sequence[Contribution], tensor: str, seed: int | None) -> torch.Tensor:
    """Trim each τ_i to its top density, elect signs by the weighted sum, take the disjoint mean
    (divided by the agreeing weights, as mergekit's normalised TIES)."""
    return _disjoint(contribs, by_count=False)


@KERNELS.register("evo_ties")
def evo_ties(contribs: Sequence[Contribution], tensor: str, seed: int | None) -> torch.Tensor:
    """TIES in Evo-Merging's coefficients: trim τ_i to its top α_i, scale it by the signed β_i,
    elect each entry's sign by the sum, and average the agreeing entries over how many agree.
    Dividing by the count, not by the weights, keeps β's size the merge's strength (every β = λ is
    TIES at scale λ), so a search can move strength and interference resolution together."""
    return _disjoint(contribs, by_count=True)


@KERNELS.register("evo_tsv")
def evo_tsv(contribs: Sequence[Contribution], tensor: str, seed: int | None) -> torch.Tensor:
    """TSV-Merge of full task vectors (the LoRA form is `lora.tsv`): each matrix β_i·τ_i kept to its
    top round(α_i·min(out, in)) singular directions, the concatenated singular vectors replaced by
    their polar factors, ΔW = U⊥·Σ·V⊥ᵀ. A vector (a norm, a bias) has no spectrum: Σ β_i·τ_i."""
    us, ss, vs = [], [], []
    vectors: torch.Tensor | None = None
    for c in contribs:
        if c.weight == 0.0:
            continue
        d = c.delta().mul_(c.weight)
        if d.ndim != 2:
            vectors = d if vectors is None else vectors.add_(d)
            continue
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        k = keep_count(s.numel(), _density(c), "round")
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    if vectors is not None:
        return vectors
    if not ss:  # every weight 0
        return torch.zeros_like(contribs[0].delta())
    b, a = decorrelate(us, ss, vs)
    return b @ a


def _disjoint(contribs: Sequence[Contribution], by_count: bool) -> torch.Tensor:
    """TIES's trim, sign election and disjoint mean of the weighted, trimmed task vectors.

    Two passes over the experts: the first accumulates the sign vote and remembers each expert's
    cutoff, the second re-derives the trimmed delta (from a cache when small) and averages the
    entries that agree with the elected sign, dividing by the agreeing weights (or their count).
    With s the elected sign, an entry agrees where s·trimmed > 0, so the agreeing sum is
    s·Σ max(s·trimmed, 0).
    """
    vote: torch.Tensor | None = None
    cuts: list[tuple[float, int]] = []
    cache: list[torch.Tensor] = []
    caching = True
    for c in contribs:
        d = c.delta()
        mask, cut = select(d, keep_count(d.numel(), _density(c), "floor"))
        trimmed = d.mul_(mask).mul_(c.weight)
        cuts.append(cut)
        vote = trimmed.clone() if vote is None else vote.add_(trimmed)
        caching = caching and d.numel() * d.element_size() * len(contribs) <= TIES_CACHE_BYTES
        if caching:
            cache.append(trimmed)
    if vote is None:
        raise RecipeError("a TIES merge needs at least one expert")
    sign = torch.where(vote >= 0, 1.0, -1.0).to(vote.dtype)
    num = vote.zero_()
    den = torch.zeros_like(num)
    for i, c in enumerate(contribs):
        if caching:
            trimmed = cache[i]
        else:
            d = c.delta()
            trimmed = d.mul_(mask_from(d, *cuts[i])).mul_(c.weight)
        signed = trimmed.mul_(sign)
        den.add_(signed > 0, alpha=1.0 if by_count else c.weight)
        num.add_(signed.clamp_(min=0))
    den.masked_fill_(den == 0, 1.0)
    return num.mul_(sign).div_(den)
