"""Evo-Merging on LoRA factors: prune A, combine A and B separately, multiply once.

For one module and adapters (A_i, B_i) with scaling s_i = lora_alpha/r:
- ``evo`` (form ``factors``, `sum_factors`): A_m = Σ β_i·S_{α_i}(A_i), B_m = Σ β_i·s_i·B_i,
  ΔW = B_m·A_m. With equal s_i this is exactly s·B_m·A_m (the paper's form); folding s_i into B
  keeps adapters of different alphas comparable. Quadratic in β; needs equal ranks.
- ``evo_tv`` (form ``concat``): ΔW = Σ β_i·s_i·B_i·S_{α_i}(A_i), linear in β; any ranks. Task
  arithmetic, linear and uniform over adapters are this with α = 1 and their effective weights.

Each method returns the factors (B, A) of one module, not ΔW: the engine multiplies them, an
adapter export writes them, so the exported adapter is the very merge that was scored.

Adapters of one module and one rank are stacked ((N, r, in) and (N, out, r)), so a candidate
costs one batched pruning and one matmul, not N of each; each A's magnitude order is found once
when the stack is built, so pruning at any α is a comparison, not a selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from evomerge.errors import RecipeError
from evomerge.merging.sparsify import keep_count, magnitude_ranks

Adapter = tuple[str, torch.Tensor, torch.Tensor, float]
"""One LoRA adapter on one module: (expert, A, B, scaling)."""


@dataclass
class Stack:
    """Factors of every adapter of one rank on one module, resident on the merge device (float32)."""

    rows: dict[str, int]   # expert -> its index along the first axis
    a: torch.Tensor        # (n, r, in)
    b: torch.Tensor        # (n, out, r)
    scaling: torch.Tensor  # (n,)
    ranks: torch.Tensor    # per adapter, each A entry's magnitude rank (see `prune_rows`)

    @classmethod
    def of(cls, adapters: Sequence[Adapter]) -> Stack:
        a = torch.stack([x[1] for x in adapters])
        b = torch.stack([x[2] for x in adapters])
        scaling = torch.tensor([x[3] for x in adapters], dtype=a.dtype, device=a.device)
        rows = {x[0]: i for i, x in enumerate(adapters)}
        return cls(rows, a, b, scaling, magnitude_ranks(a.reshape(a.shape[0], -1)))

    def materialise(self, expert: str) -> torch.Tensor:
        """One adapter's full update s·B·A, as a task vector for the classic methods."""
        i = self.rows[expert]
        return (self.b[i] @ self.a[i]).mul_(self.scaling[i])


def prune_rows(a: torch.Tensor, ranks: torch.Tensor, fractions: Sequence[float]) -> torch.Tensor:
    """Each row a[i] (any shape) with all but its round(α_i·numel) largest-|·| entries zeroed;
    `ranks` are the rows' `magnitude_ranks` (ties to the lower flat index, as in `topk_mask`)."""
    flat = a.reshape(a.shape[0], -1)
    keep = [keep_count(flat.shape[1], f, "round") for f in fractions]
    if all(k >= flat.shape[1] for k in keep):  # decided on the host: no wait on the device
        return a
    ks = on_device(keep, a.device)
    return (flat * (ranks < ks[:, None])).reshape(a.shape)


def on_device(values: Sequence[float] | Sequence[int], device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small tensor of host values on `device` without waiting for the device: a copy from
    pageable memory is staged at once (CUDA's cudaMemcpyAsync), where `torch.tensor(..., device=)`
    would synchronise the stream, once per candidate and module. On a CPU the tensor itself."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


@dataclass(frozen=True)
class Term:
    """The recipe's coefficients for the adapters of one stack: which rows, β and α of each."""

    stack: Stack
    names: tuple[str, ...]
    rows: torch.Tensor
    betas: torch.Tensor
    alphas: tuple[float, ...]

    def pruned_a(self) -> torch.Tensor:
        return prune_rows(self.stack.a[self.rows], self.stack.ranks[self.rows], self.alphas)

    def scaled_betas(self) -> torch.Tensor:
        return self.betas * self.stack.scaling[self.rows]


Factors = tuple[torch.Tensor, torch.Tensor]
"""(B, A) of one module's merged update: ΔW = B·A."""


def sum_factors(terms: Sequence[Term], module: str) -> Factors:
    """(B_m, A_m) of the factor-wise Evo merge at the experts' rank (one stack: equal ranks)."""
    if len(terms) > 1:
        ranks = ", ".join(f"{n} (r={t.stack.a.shape[1]})" for t in terms for n in t.names)
        raise RecipeError(f"method evo sums LoRA factors, which needs equal ranks, but {module} has {ranks}; "
                          "use evo_tv for adapters of different ranks")
    (t,) = terms
    a_m = torch.einsum("n,nri->ri", t.betas, t.pruned_a())
    b_m = torch.einsum("n,nor->or", t.scaled_betas(), t.stack.b[t.rows])
    return b_m, a_m


def concat(terms: Sequence[Term], module: str) -> Factors:
    """B = [β_i·s_i·B_i], A = [S_{α_i}(A_i)] side by side along the rank, so B·A = Σ β_i·s_i·B_i·S_{α_i}(A_i):
    the update of `evo_tv` and of every method linear in the task vectors, as one adapter of rank Σ r_i."""
    bs, as_ = [], []
    for t in terms:
        b = t.stack.b[t.rows] * t.scaled_betas()[:, None, None]           # (n, out, r)
        bs.append(b.permute(1, 0, 2).reshape(b.shape[1], -1))            # (out, n·r)
        as_.append(t.pruned_a().reshape(-1, t.stack.a.shape[-1]))        # (n·r, in)
    return torch.cat(bs, 1), torch.cat(as_, 0)


def tsv(terms: Sequence[Term], module: str) -> Factors:
    """Task Singular Vectors (TSV-Merge, Gargiulo et al. 2025) on LoRA factors, in Evo-Merging's
    coefficients: each adapter's update β_i·s_i·B_i·A_i as its SVD U_i·Σ_i·V_iᵀ (from QRs of B and
    A, so no out × in matrix is formed), kept to its top round(α_i·r) singular directions; then the
    concatenated U and V are each replaced by their nearest matrix with orthonormal columns (the
    polar factor), so directions the experts share are no longer counted twice and the merge's
    interference goes; ΔW = U⊥·Σ·V⊥ᵀ, an adapter of rank Σ r_i (the dropped directions kept as
    zero columns). Adapters already in orthogonal subspaces merge as evo_tv; two identical ones as one."""
    us, ss, vs = [], [], []
    for t in terms:
        b = t.stack.b[t.rows] * t.scaled_betas()[:, None, None]                  # (n, out, r)
        q_b, r_b = torch.linalg.qr(b)
        q_a, r_a = torch.linalg.qr(t.stack.a[t.rows].transpose(1, 2))            # (n, in, r)
        u, s, vh = torch.linalg.svd(r_b @ r_a.transpose(1, 2))                    # (n, r, r)
        rank = s.shape[1]
        keep = on_device([keep_count(rank, f, "round") for f in t.alphas], s.device)
        s = s * (torch.arange(rank, device=s.device) < keep[:, None])
        us.append((q_b @ u).transpose(0, 1).reshape(b.shape[1], -1))            # (out, n·r)
        vs.append((q_a @ vh.transpose(1, 2)).transpose(0, 1).reshape(q_a.shape[1], -1))
        ss.append(s.reshape(-1))
    return decorrelate(us, ss, vs)


def decorrelate(us: Sequence[torch.Tensor], ss: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]) -> Factors:
    """TSV's merge of experts' singular triplets (U_i: out × k_i, σ_i: k_i, V_i: in × k_i): the
    concatenated U and V each replaced by their polar factor P·Qᵀ (of P·Σ·Qᵀ: the nearest matrix
    with orthonormal columns), then (B, A) = (U⊥·diag σ, V⊥ᵀ). A direction of σ 0 (dropped by α,
    or a full task vector's rounding noise) is zeroed first, and the polar factor is taken over
    the nonzero singular values only (numerical rank, as numpy's matrix_rank): where experts
    share directions the concatenation is rank-deficient, and the rest of a full polar factor
    is arbitrary."""
    sigma = torch.cat(list(ss))
    live = (sigma > sigma.max() * _tolerance(us[0].shape[0] + vs[0].shape[0], sigma)).to(sigma.dtype)
    u_perp, v_perp = (_polar(torch.cat(list(m), 1) * live) for m in (us, vs))
    return u_perp * sigma, v_perp.T.contiguous()


def _polar(m: torch.Tensor) -> torch.Tensor:
    p, s, qh = torch.linalg.svd(m, full_matrices=False)
    rank = int((s > s.max() * _tolerance(max(m.shape), s)).sum()) if s.numel() else 0
    return p[:, :rank] @ qh[:rank]


def _tolerance(size: int, s: torch.Tensor) -> float:
    """Singular values below this share of the largest are rounding noise (numpy's matrix_rank)."""
    return size * torch.finfo(s.dtype).eps


FACTORS = {"factors": sum_factors, "concat": concat, "tsv": tsv}
"""How a low-rank method builds its factors, by its `MergeMethod.lora` form; a method that reads
densities prunes each A to its keep ratio α, the others leave A whole."""
