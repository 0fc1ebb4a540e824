"""Blocks: groups of consecutive decoder layers × module kind, the unit of anisotropic merging.

A block is named ``layers.{start}-{stop}.{kind}`` (stop exclusive), where kind is ``attn`` or
``mlp``. Tensors outside the decoder layers (embeddings, final norm, head) belong to no block and
take the recipe's global coefficients.
"""

from __future__ import annotations

import re

KINDS = ("attn", "mlp")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def blocks_for(num_layers: int, groups: int, kinds: tuple[str, ...] = KINDS) -> tuple[str, ...]:
    """Names of `groups` near-equal layer groups × `kinds` for a model of `num_layers` layers."""
    groups = max(1, min(groups, num_layers))
    bounds = [round(i * num_layers / groups) for i in range(groups + 1)]
    return tuple(f"layers.{bounds[g]}-{bounds[g + 1]}.{kind}" for g in range(groups) for kind in kinds)


def kind_of(tensor_name: str) -> str | None:
    """``attn`` or ``mlp`` for a decoder tensor, None for anything else."""
    if "attn" in tensor_name or "attention" in tensor_name:
        return "attn"
    if "mlp" in tensor_name or "feed_forward" in tensor_name:
        return "mlp"
    return None


def block_of(tensor_name: str, blocks: tuple[str, ...] | list[str]) -> str | None:
    """The block among `blocks` that holds `tensor_name`, or None."""
    m = _LAYER.search(tensor_name)
    kind = kind_of(tensor_name)
    if m is None or kind is None:
        return None
    layer = int(m.group(1))
    for name in blocks:
        span, bkind = name[len("layers."):].rsplit(".", 1)
        start, stop = (int(x) for x in span.split("-"))
        if bkind == kind and start <= layer < stop:
            return name
    return None
