"""`MergeRecipe`: the plain value that says how to merge, the one thing every stage agrees on.

A search space decodes a vector into a recipe, a backend applies it, the journal stores it as
JSON, and the provider receives it in a request body. It never holds tensors.

Methods (what `weights` and `densities` mean for each):
- ``evo``: Evo-Merging on LoRA factors: A = Σ β_i·S_{α_i}(A_i), B = Σ β_i·B_i (quadratic in β).
  ``weights`` = β (signed), ``densities`` = α (keep ratio of A; B is never pruned). For a full
  checkpoint expert, α prunes its task vector and β scales it.
- ``evo_tv``: the task-vector variant: ΔW = Σ β_i·B_i·S_{α_i}(A_i), linear in β.
- ``linear``: θ = Σ w_i·θ_i / Σ w_i (mergekit's linear with normalisation).
- ``task_arithmetic``: θ = θ_0 + scale·Σ w_i·τ_i.
- ``ties``: trim τ_i to its top ``densities[i]`` by magnitude, elect the sign by the weighted sum,
  average the agreeing entries (disjoint mean), times ``scale``.
- ``evo_ties``: TIES with Evo-Merging's coefficients: ``densities`` = α trims τ_i, ``weights`` = β
  (signed) scales it before the sign election, and the disjoint mean divides by how many experts
  agree, so β's size is the strength (every β = λ: TIES at scale λ).
- ``dare``: drop entries of τ_i with probability 1 − density (seeded), rescale by 1/density,
  then task arithmetic.
- ``uniform``: θ_0 + mean_i τ_i (weights are all 1/N).

``blocks`` override weights and densities for the tensors of one block (see `evomerge.blocks`).

Each method's registered `MergeMethod` (in `METHODS`) states these facts once for every stage: the
merger picks its kernel and LoRA form from it, the search spaces their bounds, the export its
mergekit name.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from numbers import Real
from typing import Any, Literal

from evomerge.errors import RecipeError
from evomerge.registry import Registry


@dataclass(frozen=True)
class MergeMethod:
    """What one merge method is: the facts recipe validation, the merger, the search spaces and the
    mergekit export read, instead of each keeping its own list of method names."""

    name: str
    kernel: str
    """Its per-tensor task-vector merge in `evomerge.merging.methods.KERNELS`, named rather than held
    so that validating a recipe never loads torch."""
    family: Literal["evo", "classic", "baseline"]
    """Which spaces search it: Evo-Merging's α/β spaces, the classic weights-densities-scale spaces,
    or none (a fixed baseline)."""
    weighting: Literal["as_given", "normalised", "uniform"] = "as_given"
    """What multiplies each task vector: its weight, w_i/Σw (linear), or 1/N (uniform)."""
    densities: bool = False
    """Whether densities change the merge (keep ratios α, TIES's trim, DARE's keep probability)."""
    lora: Literal["factors", "concat", "tsv", "dense"] = "dense"
    """How LoRA experts merge: ``factors``, A and B combined apart at the experts' rank (quadratic in
    β); ``concat``, linear in the updates, as one adapter of rank Σ r_i; ``dense``, each update B·A
    materialised (the merge has no adapter form); ``tsv``, the updates' singular vectors
    decorrelated (`evomerge.merging.lora.tsv`), an adapter of rank Σ r_i too."""
    disjoint_mean: Literal["weights", "count"] | None = None
    """TIES's sign election, then the mean of the agreeing entries over their weights or their count."""
    stochastic: bool = False
    """Drops entries at random, seeded by the recipe's seed, rescaling survivors by 1/density (DARE)."""
    mergekit: str = "task_arithmetic"
    """The mergekit merge_method an export writes (exact or with the caveats `evomerge.export` adds)."""
    mergekit_density: bool = False
    """Whether that mergekit method takes per-model densities."""

    @property
    def low_rank(self) -> bool:
        """Whether a merge of LoRA experts stays an adapter (never materialises ΔW)."""
        return self.lora != "dense"


METHODS: Registry[MergeMethod] = Registry("merge method", error=RecipeError)
"""Merge methods a recipe may name; the keys users type in YAML."""
for _method in (
    MergeMethod("evo", kernel="evo", family="evo", densities=True, lora="factors"),
    MergeMethod("evo_tv", kernel="evo", family="evo", densities=True, lora="concat"),  # evo's on a task vector
    MergeMethod("evo_ties", kernel="evo_ties", family="evo", densities=True, disjoint_mean="count",
                mergekit="ties", mergekit_density=True),
    MergeMethod("evo_tsv", kernel="evo_tsv", family="evo", densities=True, lora="tsv"),
    MergeMethod("linear", kernel="task_arithmetic", family="classic", weighting="normalised", lora="concat"),
    MergeMethod("task_arithmetic", kernel="task_arithmetic", family="classic", lora="concat"),
    MergeMethod("ties", kernel="ties", family="classic", densities=True, disjoint_mean="weights",
                mergekit="ties", mergekit_density=True),
    MergeMethod("dare", kernel="dare", family="classic", densities=True, stochastic=True,
                mergekit="dare_linear", mergekit_density=True),
    MergeMethod("uniform", kernel="task_arithmetic", family="baseline", weighting="uniform", lora="concat"),
):
    METHODS.add(_method.name, _method)


def methods_in(family: str) -> tuple[str, ...]:
    """The names of the methods of one `MergeMethod.family`, in registration order."""
    return tuple(name for name in METHODS if METHODS[name].family == family)


def _floats(values: Sequence[float], what: str) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or any(isinstance(v, (bool, str, bytes)) or not isinstance(v, Real)
                                               for v in values):
        raise RecipeError(f"{what} must hold numbers (not strings or booleans), got {list(values)!r:.80}")
    out = tuple(map(float, values))
    if not all(map(math.isfinite, out)):
        i, v = next((i, v) for i, v in enumerate(out) if not math.isfinite(v))
        raise RecipeError(f"{what}[{i}] is {v}; every coefficient must be a finite number")
    return out


def _densities(values: Sequence[float] | None, n: int, what: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    out = _floats(values, what)
    if len(out) != n:
        raise RecipeError(f"{what} has {len(out)} values for {n} experts; give one per expert")
    for i, v in enumerate(out):
        if not 0.0 <= v <= 1.0:
            raise RecipeError(f"{what}[{i}] is {v}; keep ratios and densities lie in [0, 1]")
    return out


@dataclass(frozen=True)
class BlockOverride:
    """Weights (and densities) used instead of the recipe's own for the tensors of one block."""

    name: str
    weights: tuple[float, ...]
    densities: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weights": list(self.weights),
                "densities": None if self.densities is None else list(self.densities)}


@dataclass(frozen=True)
class MergeRecipe:
    """How to merge named experts: a method, one weight per expert, optional densities."""

    method: str
    experts: tuple[str, ...]
    weights: tuple[float, ...]
    densities: tuple[float, ...] | None = None
    scale: float = 1.0
    blocks: tuple[BlockOverride, ...] = ()
    seed: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        METHODS[self.method]  # raises naming the known methods
        experts = tuple(str(e) for e in self.experts)
        if not experts:
            raise RecipeError("a recipe needs at least one expert")
        if len(set(experts)) != len(experts):
            raise RecipeError("a recipe names an expert twice; list each expert once")
        weights = _floats(self.weights, "weights")
        if len(weights) != len(experts):
            raise RecipeError(f"weights has {len(weights)} values for {len(experts)} experts; give one per expert")
        scale = _floats([self.scale], "scale")[0]
        blocks = tuple(
            b if isinstance(b, BlockOverride) else BlockOverride(**b) for b in self.blocks
        )
        checked = []
        for b in blocks:
            bw = _floats(b.weights, f"blocks[{b.name}].weights")
            if len(bw) != len(experts):
                raise RecipeError(f"block {b.name!r} has {len(bw)} weights for {len(experts)} experts")
            bd = _densities(b.densities, len(experts), f"blocks[{b.name}].densities")
            checked.append(BlockOverride(b.name, bw, bd))
        object.__setattr__(self, "experts", experts)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "densities", _densities(self.densities, len(experts), "densities"))
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "blocks", tuple(checked))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `from_dict` inverts it exactly."""
        out: dict[str, Any] = {"method": self.method, "experts": list(self.experts),
                               "weights": list(self.weights)}
        if self.densities is not None:
            out["densities"] = list(self.densities)
        if self.scale != 1.0:
            out["scale"] = self.scale
        if self.blocks:
            out["blocks"] = [b.to_dict() for b in self.blocks]
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergeRecipe:
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a JSON object, not {type(data).__name__}")
        unknown = set(data) - {"method", "experts", "weights", "densities", "scale", "blocks", "seed"}
        if unknown:
            raise RecipeError(f"unknown recipe field(s) {sorted(unknown)}; allowed: method, experts, "
                              "weights, densities, scale, blocks, seed")
        try:
            return cls(
                method=data["method"],
                experts=tuple(data["experts"]),
                weights=tuple(data["weights"]),
                densities=None if data.get("densities") is None else tuple(data["densities"]),
                scale=data.get("scale", 1.0),
                blocks=tuple(BlockOverride(b["name"], tuple(b["weights"]),
                                           None if b.get("densities") is None else tuple(b["densities"]))
                             for b in data.get("blocks", ())),
                seed=data.get("seed"),
            )
        except KeyError as exc:
            raise RecipeError(f"recipe is missing the field {exc.args[0]!r}") from None
        except TypeError as exc:
            raise RecipeError(f"recipe has a field of the wrong type: {exc}") from None

    @cached_property
    def _json(self) -> str:  # computed once: the scheduler, journal and cache all need it
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @cached_property
    def _key(self) -> str:
        return hashlib.sha256(self._json.encode()).hexdigest()[:32]

    def to_json(self) -> str:
        return self._json

    def key(self) -> str:
        """A stable hash of the recipe: equal recipes share it (journal cache, provider LRU)."""
        return self._key

    def coefficients(self, block: str | None = None) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
        """Weights and densities in force for `block` (the recipe's own where none overrides)."""
        for b in self.blocks:
            if b.name == block:
                return b.weights, (b.densities if b.densities is not None else self.densities)
        return self.weights, self.densities


def effective_weights(method: str, weights: Sequence[float]) -> tuple[float, ...]:
    """The weights each task vector is multiplied by; linear and uniform are task arithmetic with these.

    ``linear`` (θ = Σ w_i·θ_i / Σ w_i) is θ_0 + Σ (w_i/Σw)·τ_i; ``uniform`` is θ_0 + Σ τ_i/N. Doing
    the normalisation over the recipe's experts (not over those touching a tensor) keeps adapters
    that leave a tensor alone counted as τ_i = 0 there.
    """
    weighting = METHODS[method].weighting
    if weighting == "uniform":
        return (1.0 / len(weights),) * len(weights)
    if weighting == "normalised":
        total = sum(weights)
        if abs(total) < 1e-8:
            raise RecipeError("linear merge weights sum to zero; use task_arithmetic for signed weights")
        return tuple(w / total for w in weights)
    return tuple(weights)


def uniform(experts: Sequence[str]) -> MergeRecipe:
    """The uniform average of `experts`' task vectors: the baseline every search must beat."""
    n = len(experts)
    return MergeRecipe("uniform", tuple(experts), (1.0 / n,) * n)
