"""Magnitude trimming and random dropping of one tensor, with deterministic tie-breaking.

Keeping the k largest |x| is ambiguous where values tie at the cutoff (deltas rounded to a
bfloat16 base tie often). Rule here, everywhere: larger magnitude first, then the lower flat index
(what a stable descending sort gives, and what mergekit's CPU argsort yields). A threshold plus an
explicit tie fill costs two histogram passes instead of a full sort (mergekit sorts every tensor).
"""

from __future__ import annotations

import hashlib
import math

import torch


def keep_count(numel: int, fraction: float, rule: str) -> int:
    """How many entries a keep ratio keeps.

    ``round`` (Evo-Merging's S_α): round-half-up of α·numel. ``floor`` (TIES, as mergekit):
    int(d·numel), at least one entry for any positive density.
    """
    if fraction >= 1.0:
        return numel
    if fraction <= 0.0 or numel == 0:
        return 0
    if rule == "round":
        return min(numel, int(math.floor(fraction * numel + 0.5)))
    return max(1, int(fraction * numel))


RADIX_MIN = 1 << 16
"""From this many entries on, the cutoff is found by radix selection instead of `kthvalue`."""


def _kth_largest_radix(mag: torch.Tensor, k: int) -> tuple[float, int]:
    """Exact k-th largest of non-negative floats, and how many entries exceed it, in two histogram
    passes over their bit patterns.

    For x ≥ 0 the IEEE-754 bits read as int32 are ordered like the values, so counting the top 16
    bits finds the bucket of the k-th largest, and counting the low 16 bits inside it finds the
    value: ~4x faster than `kthvalue` on a million entries, and no sort. The histograms also give
    the count above the cutoff, which saves a pass over the mask.
    """
    bits = mag.view(torch.int32)
    hi = bits >> 16
    at_least = torch.bincount(hi, minlength=1 << 15).flip(0).cumsum(0).flip(0)  # count with hi >= b
    bucket = int(torch.nonzero(at_least >= k)[-1])
    above = int(at_least[bucket + 1]) if bucket + 1 < at_least.numel() else 0
    low = torch.bincount(bits[hi == bucket] & 0xFFFF, minlength=1 << 16).flip(0).cumsum(0).flip(0)
    lo = int(torch.nonzero(low >= k - above)[-1])
    greater = above + (int(low[lo + 1]) if lo + 1 < low.numel() else 0)
    return torch.tensor((bucket << 16) | lo, dtype=torch.int32).view(torch.float32).item(), greater


def select(x: torch.Tensor, k: int) -> tuple[torch.Tensor, tuple[float, int]]:
    """The keep-mask of the k largest |x| and its description (threshold, ties).

    Entries above the threshold are kept, plus the first ``ties`` entries equal to it; given the
    description, `mask_from` rebuilds the mask in a second pass without another selection.
    """
    mag = x.reshape(-1).abs().float()
    n = mag.numel()
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool), (-math.inf, 0)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool), (math.inf, 0)
    if n >= RADIX_MIN:
        threshold, greater = _kth_largest_radix(mag, k)
        mask = mag > threshold
    else:
        threshold = float(torch.kthvalue(mag, n - k + 1).values)
        mask = mag > threshold
        greater = int(mask.sum())
    ties = k - greater
    if ties > 0:
        mask[torch.nonzero(mag == threshold, as_tuple=True)[0][:ties]] = True
    return mask.reshape(x.shape), (threshold, ties)


def magnitude_ranks(x: torch.Tensor) -> torch.Tensor:
    """Each entry's place, per row of a 2-D x, in the order larger |x| first, ties to the lower
    index: ``ranks < k`` is the keep-mask of the k largest, the same rule as `topk_mask`. Found
    once for a tensor that never changes (a LoRA A), it makes every later pruning of it one
    comparison instead of a selection (per candidate, 32 adapters x 210 modules of SmolLM2)."""
    order = x.abs().float().sort(dim=1, descending=True, stable=True).indices
    places = torch.arange(x.shape[1], dtype=torch.int32, device=x.device).expand(order.shape).contiguous()
    return torch.empty(order.shape, dtype=torch.int32, device=x.device).scatter_(1, order, places)


def mask_from(x: torch.Tensor, threshold: float, ties: int) -> torch.Tensor:
    """The boolean keep-mask that `select` described."""
    mag = x.reshape(-1).abs().float()
    mask = mag > threshold
    if ties > 0:
        mask[torch.nonzero(mag == threshold, as_tuple=True)[0][:ties]] = True
    return mask.reshape(x.shape)


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest-|x| entries; ties at the cutoff go to lower flat indices."""
    return select(x, k)[0]


def prune(x: torch.Tensor, fraction: float, rule: str = "round") -> torch.Tensor:
    """x with all but its largest-magnitude `fraction` zeroed (no rescaling)."""
    if fraction >= 1.0:
        return x
    return x * topk_mask(x, keep_count(x.numel(), fraction, rule))


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare(x: torch.Tensor, density: float, seed: int | None, expert: str, tensor: str) -> torch.Tensor:
    """Drop each entry with probability 1 − density, rescale survivors by 1/density (DARE).

    The mask depends only on (seed, expert, tensor), never on evaluation order or device.
    """
    if density >= 1.0:
        return x
    if density <= 0.0:
        return torch.zeros_like(x)
    gen = torch.Generator(device="cpu").manual_seed(_seed(seed or 0, expert, tensor))
    keep = torch.rand(x.shape, generator=gen) < density
    return x * keep.to(x.device) / density
