"""Evo-Merging on LoRA factors: prune A, combine A and B separately, multiply once.

For one module and adapters (A_i, B_i) with scaling s_i = lora_alpha/r:
- ``evo``: A_m = Σ β_i·S_{α_i}(A_i), B_m = Σ β_i·s_i·B_i, ΔW = B_m·A_m. With equal s_i this is
  exactly s·B_m·A_m (the paper's form); folding s_i into B keeps adapters of different alphas
  comparable. Quadratic in β; needs equal ranks.
- ``evo_tv``: ΔW = Σ β_i·s_i·B_i·S_{α_i}(A_i), linear in β; any ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from evomerge.errors import RecipeError
from evomerge.merging.sparsify import prune


@dataclass(frozen=True)
class Factors:
    """One adapter's factors for one module, resident on the merge device (float32)."""

    expert: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float


def materialise(f: Factors) -> torch.Tensor:
    """The adapter's full update s·B·A, as a task vector for the classic methods."""
    return (f.b @ f.a).mul_(f.scaling)


def evo(factors: Sequence[tuple[Factors, float, float]], module: str) -> torch.Tensor:
    """ΔW of the factor-wise Evo merge; `factors` holds (factors, β, α) per adapter."""
    ranks = {f.a.shape[0] for f, _, _ in factors}
    if len(ranks) > 1:
        names = ", ".join(f"{f.expert} (r={f.a.shape[0]})" for f, _, _ in factors)
        raise RecipeError(f"method evo sums LoRA factors, which needs equal ranks, but {module} has {names}; "
                          "use evo_tv for adapters of different ranks")
    a_m = b_m = None
    for f, beta, alpha in factors:
        a = prune(f.a, alpha, "round") * beta
        b = f.b * (beta * f.scaling)
        a_m = a if a_m is None else a_m.add_(a)
        b_m = b if b_m is None else b_m.add_(b)
    return b_m @ a_m


def evo_tv(factors: Sequence[tuple[Factors, float, float]], module: str) -> torch.Tensor:
    """ΔW of the task-vector Evo variant, Σ β_i·s_i·B_i·S_{α_i}(A_i)."""
    total = None
    for f, beta, alpha in factors:
        if beta == 0.0:
            continue
        term = f.b @ prune(f.a, alpha, "round")
        term.mul_(beta * f.scaling)
        total = term if total is None else total.add_(term)
    if total is None:
        f = factors[0][0]
        total = torch.zeros(f.b.shape[0], f.a.shape[1], dtype=f.a.dtype, device=f.a.device)
    return total


FACTOR_METHODS = {"evo": evo, "evo_tv": evo_tv}
