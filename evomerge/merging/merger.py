"""Turn a recipe into merged deltas, one tensor at a time, without writing anything to disk.

`Merger` holds every LoRA adapter's factors resident on the merge device (they are small). Full
checkpoints are viewed tensor by tensor through memory maps: on the CPU a merge over 32 full
experts reads their bytes from the page cache and needs the anonymous memory of a few tensors, not
of 32 models; on a GPU each expert tensor is copied to the device the first time a merge reads it
and stays there while the device has room (`resident_bytes`), so later candidates never cross
the bus. It yields (tensor name, ΔW) in float32; the engine adds ΔW to the resident base weights,
an export writes base + ΔW to a file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache, partial

import torch

from evomerge.blocks import block_of
from evomerge.errors import RecipeError
from evomerge.merging import lora
from evomerge.merging.methods import KERNELS, Contribution
from evomerge.recipe import METHODS, MergeRecipe, effective_weights
from evomerge.repository import Expert, Repository, TensorReader

BaseTensor = Callable[[str], torch.Tensor]
"""Returns the base model's tensor of a name (any dtype, on the merge device)."""


class Merger:
    """Computes merged deltas of recipes over one repository on one device."""

    def __init__(self, repository: Repository, device: str | torch.device = "cpu",
                 resident_bytes: int | None = None) -> None:
        self.repository = repository
        self.device = torch.device(device)
        self._reader = TensorReader()
        self._resident: dict[tuple[str, str], torch.Tensor] = {}
        self._room = resident_bytes
        self._costs: dict[str, float] = {}                     # recipe key -> low_rank_cost
        adapters: dict[str, dict[int, list[lora.Adapter]]] = {}
        for expert in repository.experts.values():
            for target, m in expert.modules.items():
                adapters.setdefault(target, {}).setdefault(m.rank, []).append(
                    (expert.name, self._load(expert, m.a_key), self._load(expert, m.b_key), m.scaling))
        # target -> rank -> adapters; each list is popped as it is stacked, so one copy is held at a time
        self._stacks = {target: {rank: lora.Stack.of(by_rank.pop(rank)) for rank in list(by_rank)}
                        for target, by_rank in adapters.items()}

    def _load(self, expert: Expert, key: str) -> torch.Tensor:
        return self._reader.get(expert.files, key).to(self.device, torch.float32)

    def targets(self, recipe: MergeRecipe) -> list[str]:
        """Names of the base tensors `recipe` changes, in the base checkpoint's order."""
        experts = [self.repository.expert(n) for n in recipe.experts]
        if any(e.kind == "full" for e in experts):
            return list(self.repository.base_files)
        touched = set().union(*(e.modules for e in experts))
        return [k for k in self.repository.base_files if k in touched]

    def deltas(self, recipe: MergeRecipe, base: BaseTensor) -> Iterator[tuple[str, torch.Tensor]]:
        """(tensor name, merged ΔW in float32) for every tensor `recipe` changes."""
        experts = [self.repository.expert(n) for n in recipe.experts]
        method = METHODS[recipe.method]
        factor_method = lora.FACTORS.get(method.lora)  # None: LoRA experts join as dense task vectors
        kernel = KERNELS[method.kernel]
        for name in self.targets(recipe):
            weights, densities = self._coefficients(recipe, name)
            # the base tensor in float32, read once and only if a full expert needs it
            base_f32 = cache(lambda name=name: base(name).to(self.device, torch.float32))
            contribs: list[Contribution] = []
            for i, e in enumerate(experts):
                density = None if densities is None else densities[i]
                if e.kind == "full":
                    task_vector = partial(self._task_vector, e, name, base_f32)
                    contribs.append(Contribution(e.name, weights[i], density, task_vector))
                elif name in e.modules and factor_method is None:  # an adapter off this tensor has τ_i = 0 here
                    materialise = self._stacks[name][e.modules[name].rank].materialise
                    contribs.append(Contribution(e.name, weights[i], density, partial(materialise, e.name)))
            delta = None
            terms = self._terms(recipe, name, experts, weights, densities) if factor_method is not None else []
            if terms and factor_method is not None:
                b, a = factor_method(terms, name)
                delta = b @ a
            if contribs:
                part = kernel(contribs, name, recipe.seed)
                delta = part if delta is None else delta.add_(part)
            if delta is None:
                continue
            if recipe.scale != 1.0:
                delta.mul_(recipe.scale)
            yield name, delta

    def low_rank_refusal(self, recipe: MergeRecipe) -> str | None:
        """Why `recipe` has no adapter form (None when it stays low-rank: LoRA experts only, merged
        by a method that is `MergeMethod.low_rank`)."""
        if not METHODS[recipe.method].low_rank:
            return (f"a {recipe.method} merge of LoRA experts is not low-rank (it trims or drops entries of each "
                    "full update B·A), so it has no adapter form; export the merged checkpoint (--model) instead")
        full = next((n for n in recipe.experts if self.repository.expert(n).kind == "full"), None)
        if full is not None:
            return (f"expert {full!r} is a full checkpoint, so the merge has no adapter form; export the merged "
                    "checkpoint (--model) instead")
        return None

    def stays_low_rank(self, recipe: MergeRecipe, max_cost: float | None = None) -> bool:
        """Whether `recipe` may share a population forward: it has an adapter form and (given
        `max_cost`) a `low_rank_cost` of at most that. False, never an error, for a recipe invalid
        here (an unknown expert, linear weights summing to zero): it fails alone, on the
        one-at-a-time path, with its own error."""
        try:
            return (self.low_rank_refusal(recipe) is None
                    and (max_cost is None or self.low_rank_cost(recipe) <= max_cost))
        except Exception:
            return False

    def low_rank(self, recipe: MergeRecipe) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(tensor name, B, A) with B·A the very ΔW `deltas` gives, for a recipe that stays low-rank."""
        refusal = self.low_rank_refusal(recipe)
        if refusal is not None:
            raise RecipeError(refusal)
        factor_method = lora.FACTORS[METHODS[recipe.method].lora]
        experts = [self.repository.expert(n) for n in recipe.experts]
        for name in self.targets(recipe):
            weights, densities = self._coefficients(recipe, name)
            terms = self._terms(recipe, name, experts, weights, densities)
            if terms:
                b, a = factor_method(terms, name)
                yield name, (b.mul_(recipe.scale) if recipe.scale != 1.0 else b), a

    def low_rank_cost(self, recipe: MergeRecipe) -> float:
        """Multiply-adds per token of serving a low-rank `recipe` as (x·Aᵀ)·Bᵀ beside the base
        layers it adapts, per multiply-add of those layers (r·(in + out) against in·out; block
        overrides ignored): what a population forward adds where a merge adds nothing per token.
        Remembered per recipe (the same candidate is asked again on each split and rung)."""
        key = recipe.key()
        cost = self._costs.get(key)
        if cost is None:
            if len(self._costs) >= 4096:  # a long search sees endless distinct recipes
                self._costs.clear()
            cost = self._costs[key] = self._low_rank_cost(recipe)
        return cost

    def _low_rank_cost(self, recipe: MergeRecipe) -> float:
        experts = [self.repository.expert(n) for n in recipe.experts]
        keeps_rank = METHODS[recipe.method].lora == "factors"  # sums factors; concatenating adds ranks
        added = base = 0
        for name in self.targets(recipe):
            weights, _ = self._coefficients(recipe, name)
            ranks = [e.modules[name].rank for e, w in zip(experts, weights, strict=True)
                     if w != 0.0 and name in e.modules]
            if ranks:
                stack = next(iter(self._stacks[name].values()))
                n_in, n_out = stack.a.shape[2], stack.b.shape[1]
                added += (max(ranks) if keeps_rank else sum(ranks)) * (n_in + n_out)
                base += n_in * n_out
        return added / base if base else 0.0

    def _coefficients(self, recipe: MergeRecipe, name: str) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
        """The weights each expert's task vector is multiplied by on tensor `name`, and the densities."""
        blocks = tuple(b.name for b in recipe.blocks)
        weights, densities = recipe.coefficients(block_of(name, blocks) if blocks else None)
        return effective_weights(recipe.method, weights), densities

    def _terms(self, recipe: MergeRecipe, name: str, experts: list[Expert], weights: tuple[float, ...],
               densities: tuple[float, ...] | None) -> list[lora.Term]:
        """The adapters on tensor `name`, one `Term` per rank; an expert of weight 0 adds nothing (in
        evo as well: β_i = 0 drops it from both factor sums), so it takes no rank."""
        picked: dict[int, list[int]] = {}
        for i, e in enumerate(experts):
            if e.kind == "lora" and name in e.modules and weights[i] != 0.0:
                picked.setdefault(e.modules[name].rank, []).append(i)
        alphas = densities if densities is not None and METHODS[recipe.method].densities else None
        return [self._term(self._stacks[name][rank], [experts[i].name for i in idx], [weights[i] for i in idx],
                           [1.0 if alphas is None else alphas[i] for i in idx])
                for rank, idx in sorted(picked.items())]

    def _term(self, stack: lora.Stack, names: list[str], betas: list[float], alphas: list[float]) -> lora.Term:
        rows = lora.on_device([stack.rows[n] for n in names], self.device)
        return lora.Term(stack, tuple(names), rows, lora.on_device(betas, self.device, torch.float32), tuple(alphas))

    def _expert_tensor(self, expert: Expert, name: str) -> torch.Tensor:
        """A full expert's tensor on the merge device, kept there while it fits (never written to)."""
        key = (expert.name, name)
        tensor = self._resident.get(key)
        if tensor is not None:
            return tensor
        tensor = self._reader.get(expert.files, name)
        if self.device.type == "cpu":
            return tensor
        tensor = tensor.to(self.device)
        if self._room is None:
            self._room = default_resident_bytes(self.device)
        if tensor.nbytes <= self._room:
            self._resident[key] = tensor
            self._room -= tensor.nbytes
        return tensor

    def _task_vector(self, expert: Expert, name: str, base_f32: Callable[[], torch.Tensor]) -> torch.Tensor:
        return torch.sub(self._expert_tensor(expert, name), base_f32()).float()

    def close(self) -> None:
        self._reader.close()
        self._stacks.clear()
        self._resident.clear()
        self._costs.clear()


def default_resident_bytes(device: torch.device) -> int:
    """Room for resident experts on an accelerator: what is free now, less a quarter of the card
    (activations of the scoring passes, the merge's own temporaries)."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return max(0, free - total // 4)
