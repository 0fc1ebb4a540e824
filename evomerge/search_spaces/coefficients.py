"""One layout for every coefficient space: which recipe fields are searched, in which order.

The evo, classic and blockwise spaces differ only in their fields (weights, densities, scale),
bounds, starts, and whether weights and densities repeat per block; `CoefficientSpace` holds
that layout, so decode/encode/penalty are written once. Decoding copies numbers straight into
the recipe, so `decode(encode(r)) == r` holds exactly, float for float.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.errors import ConfigError, SearchSpaceError
from evomerge.recipe import BlockOverride, MergeRecipe
from evomerge.search_spaces._base import SearchSpace

PER_EXPERT = ("weights", "densities")


@dataclass(frozen=True)
class Field:
    """A recipe field: its bounds, its start (its value, when not searched), searched or fixed."""

    name: str
    lower: float
    upper: float
    start: tuple[float, ...]
    searched: bool = True

    def __post_init__(self) -> None:
        if self.name not in (*PER_EXPERT, "scale"):
            raise ConfigError(f"unknown coefficient field {self.name!r}; use weights, densities or scale")
        if not self.lower < self.upper:
            raise ConfigError(f"{self.name} bounds [{self.lower}, {self.upper}] are empty; lower must be below upper")
        if any(not self.lower <= v <= self.upper for v in self.start):
            raise ConfigError(f"{self.name} start {list(self.start)} lies outside [{self.lower}, {self.upper}]; "
                              "move it inside the bounds")


def per_expert(values: float | Sequence[float] | None, n: int, default: float, what: str) -> tuple[float, ...]:
    """A scalar or one value per expert, as a tuple of n floats."""
    if values is None:
        return (float(default),) * n
    if np.isscalar(values):
        return (float(values),) * n  # type: ignore[arg-type]
    out = tuple(float(v) for v in values)  # type: ignore[union-attr]
    if len(out) != n:
        raise ConfigError(f"{what} has {len(out)} values for {n} experts; give one per expert or a single number")
    return out


class CoefficientSpace(SearchSpace):
    """z = the searched fields, concatenated in order; with `blocks`, weights and densities are
    searched once per block (block-major: block 0's values for every expert, then block 1's).

    With blocks, the recipe's global weights and densities (used by tensors outside every block:
    embeddings, final norm, head) are the mean over blocks; a recipe whose global values differ
    from that mean is not in the space."""

    name = "coefficients"

    def __init__(self, method: str, experts: Sequence[str], fields: Sequence[Field], *,
                 penalty: float = 0.0, sigma0: float = 0.05, blocks: Sequence[str] = (),
                 seed: int | None = None, label: str | None = None) -> None:
        self.method = method
        self.experts = tuple(str(e) for e in experts)
        if not self.experts:
            raise ConfigError("a search space needs at least one expert")
        self.fields = tuple(fields)
        self.blocks = tuple(blocks)
        self.seed = seed
        if label:
            self.name = label
        if penalty < 0:
            raise ConfigError(f"penalty must be non-negative, got {penalty}")
        self.penalty_weight = float(penalty)
        self.sigma0 = float(sigma0)
        if not self.sigma0 > 0:
            raise ConfigError(f"sigma0 must be positive, got {sigma0}")
        n = len(self.experts)
        if "weights" not in [f.name for f in self.fields]:
            raise ConfigError("a coefficient space needs a weights field (searched or fixed)")
        for f in self.fields:
            expected = n if f.name in PER_EXPERT else 1
            if len(f.start) != expected:
                raise ConfigError(f"{f.name} start has {len(f.start)} values; expected {expected}")
        lo, hi, x0 = [], [], []
        for f in self.fields:
            if f.searched:
                reps = self._reps(f)
                lo += [f.lower] * (len(f.start) * reps)
                hi += [f.upper] * (len(f.start) * reps)
                x0 += list(f.start) * reps
        if not x0:
            raise ConfigError(f"{self.name} space searches nothing; search at least one of its fields")
        self.lower, self.upper, self.x0 = np.array(lo), np.array(hi), np.array(x0)

    def _reps(self, f: Field) -> int:
        return len(self.blocks) if (self.blocks and f.name in PER_EXPERT) else 1

    def _split(self, z: np.ndarray) -> dict[str, np.ndarray]:
        """Each field's values: shape (blocks or 1, len(start)), fixed fields from their start."""
        out, i = {}, 0
        for f in self.fields:
            reps, size = self._reps(f), len(f.start)
            if f.searched:
                out[f.name] = z[i:i + reps * size].reshape(reps, size)
                i += reps * size
            else:
                out[f.name] = np.tile(np.array(f.start), (reps, 1))
        return out

    def _decode(self, z: np.ndarray) -> MergeRecipe:
        v = self._split(z)
        w, d = v["weights"], v.get("densities")
        weights = tuple(w.mean(axis=0).tolist())
        densities = None if d is None else tuple(d.mean(axis=0).tolist())
        blocks = tuple(BlockOverride(name, tuple(w[b].tolist()), None if d is None else tuple(d[b].tolist()))
                       for b, name in enumerate(self.blocks))
        scale = float(v["scale"][0, 0]) if "scale" in v else 1.0
        return MergeRecipe(self.method, self.experts, weights, densities, scale, blocks, self.seed)

    def encode(self, recipe: MergeRecipe) -> np.ndarray:
        if recipe.method != self.method or recipe.experts != self.experts:
            raise SearchSpaceError(f"{self.name} space holds {self.method} recipes of experts {list(self.experts)}; "
                                   f"got a {recipe.method} recipe of {list(recipe.experts)}")
        if recipe.seed != self.seed:
            raise SearchSpaceError(f"{self.name} space uses seed {self.seed}, the recipe seed {recipe.seed}")
        if tuple(b.name for b in recipe.blocks) != self.blocks:
            raise SearchSpaceError(f"{self.name} space has blocks {list(self.blocks)}, "
                                   f"the recipe {[b.name for b in recipe.blocks]}")
        values = self._recipe_values(recipe)
        parts = []
        for f in self.fields:
            got = values[f.name]
            if got is None:
                raise SearchSpaceError(f"the recipe has no {f.name}, which the {self.name} space needs")
            if not f.searched:
                if not np.array_equal(got, np.tile(np.array(f.start), (got.shape[0], 1))):
                    raise SearchSpaceError(f"the recipe's {f.name} {got.tolist()} differ from the {self.name} "
                                           f"space's fixed values {list(f.start)}")
                continue
            if np.any(got < f.lower) or np.any(got > f.upper):
                raise SearchSpaceError(f"the recipe's {f.name} {got.tolist()} leave the bounds [{f.lower}, {f.upper}]")
            parts.append(got.reshape(-1))
        z = np.concatenate(parts)
        if self._decode(z) != recipe:
            raise SearchSpaceError(f"the {self.name} space cannot express this recipe exactly "
                                   "(its global coefficients are not the mean of its blocks')")
        return z

    def _recipe_values(self, recipe: MergeRecipe) -> dict[str, np.ndarray | None]:
        if self.blocks:
            w = np.array([b.weights for b in recipe.blocks])
            dense = any(b.densities is None for b in recipe.blocks)
            d = None if dense else np.array([b.densities for b in recipe.blocks])
        else:
            w = np.array([recipe.weights])
            d = None if recipe.densities is None else np.array([recipe.densities])
        return {"weights": w, "densities": d, "scale": np.array([[recipe.scale]])}

    def penalty(self, z: np.ndarray) -> float:
        """λ·mean|z| over the searched coordinates (Evo-Merging's and LoraHub's L1 term)."""
        if self.penalty_weight == 0.0:
            return 0.0
        return self.penalty_weight * float(np.mean(np.abs(self.check(z))))

    def describe(self) -> dict[str, Any]:
        return {"space": self.name, "method": self.method, "dim": self.dim, "experts": list(self.experts),
                "searched": [f.name for f in self.fields if f.searched], "blocks": list(self.blocks),
                "bounds": {f.name: [f.lower, f.upper] for f in self.fields},
                "fixed": {f.name: list(f.start) for f in self.fields if not f.searched},
                "penalty": self.penalty_weight, "sigma0": self.sigma0, "seed": self.seed}
