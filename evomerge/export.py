"""Exports of a recipe: JSON (evomerge's own), a mergekit YAML, a PEFT adapter, a merged checkpoint.

The mergekit YAML is exact for the methods mergekit shares: every per-tensor weight is the one
evomerge multiplies that tensor's task vector by, block overrides become filters checked against
every base tensor name (mergekit takes the first filter that is a substring of the name), LoRA
experts are ``base+adapter`` references. What mergekit cannot express (the keep ratios α of
`evo`/`evo_tv`, the factor products of `evo`, the exact DARE masks) is said in a comment at the top.
The adapter and checkpoint come from `evomerge.merging.save` (torch loads only there).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from evomerge.blocks import block_of
from evomerge.errors import ConfigError, RecipeError
from evomerge.recipe import METHODS, MergeRecipe, effective_weights
from evomerge.repository import ALIGNED_SUFFIX, Repository

if TYPE_CHECKING:
    from evomerge.api import SearchResult
    from evomerge.backends import Weights
    from evomerge.baselines import TestReport
    from evomerge.config import SearchConfig

_LAYER_PART = 3  # "model.layers.N.self_attn.q_proj.weight" -> group "model.layers.N.self_attn."

Value = Callable[[tuple[float, ...], "tuple[float, ...] | None"], float]
"""One expert's mergekit parameter from the weights and densities in force on a tensor."""


def _values(recipe: MergeRecipe, as_linear: bool) -> dict[str, Callable[[int], Value]]:
    """mergekit's per-expert parameters, each as a function of the coefficients in force."""
    method = METHODS[recipe.method]
    strength = _strength(recipe)

    def weight(i: int) -> Value:
        def f(w: tuple[float, ...], d: tuple[float, ...] | None) -> float:
            if as_linear:                              # mergekit's linear normalises by Σw itself
                return w[i]
            ew = effective_weights(recipe.method, w)[i]
            if method.stochastic:                      # evomerge rescales survivors by 1/density
                density = 1.0 if d is None else d[i]
                return 0.0 if density == 0.0 else ew / density
            return ew / strength                       # evo_ties: mergekit's normalised TIES cancels a common β
        return f

    def density(i: int) -> Value:
        return lambda w, d: 1.0 if d is None else d[i]

    return {"weight": weight, **({"density": density} if method.mergekit_density else {})}


def _groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Base tensors by the component after their layer index (one filter covers each group)."""
    out: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        i = next((k for k, p in enumerate(parts[:-1]) if p == "layers" and parts[k + 1].isdigit()), None)
        key = name if i is None or len(parts) <= i + _LAYER_PART else ".".join(parts[: i + _LAYER_PART]) + "."
        out.setdefault(key, []).append(name)
    return out


def _resolve(entries: list[dict[str, Any]], name: str) -> float:
    """What mergekit takes for tensor `name`: the first entry whose filter is a substring of it."""
    return next(e["value"] for e in entries if "filter" not in e or e["filter"] in name)


def _setting(recipe: MergeRecipe, value: Value, names: Sequence[str]) -> Any:
    """A scalar, or mergekit filters giving each base tensor the value evomerge uses on it."""
    default = value(*recipe.coefficients(None))
    if not recipe.blocks or not names:
        return default
    blocks = tuple(b.name for b in recipe.blocks)
    want = {n: value(*recipe.coefficients(block_of(n, blocks))) for n in names}
    for grouped in (True, False):
        entries = []
        groups = _groups(names) if grouped else {n: [n] for n in sorted(names, key=len, reverse=True)}
        for key, members in groups.items():
            values = {want[m] for m in members}
            if len(values) == 1 and (v := values.pop()) != default:
                entries.append({"filter": key, "value": v})
        entries.append({"value": default})
        if all(_resolve(entries, n) == want[n] for n in names):
            return entries if len(entries) > 1 else default
    raise RecipeError("the block overrides cannot be written as mergekit filters over these tensor names")


def _caveats(recipe: MergeRecipe, repository: Repository | None) -> list[str]:
    """What the YAML does not reproduce, in plain words."""
    notes = []
    method = METHODS[recipe.method]
    lora = repository is not None and any(repository.expert(e).kind == "lora" for e in recipe.experts)
    if method.lora == "factors" and (lora or repository is None):
        notes.append(f"Not exact: {method.name} multiplies merged LoRA factors, (Σ β_i·s_i·B_i)(Σ β_i·S_α_i(A_i)), "
                     "which is quadratic in β with cross terms; mergekit has no such method. Below is task arithmetic "
                     "with the scales β as weights.")
    if method.lora == "tsv":
        notes.append(f"Not exact: {method.name} replaces the experts' singular vectors by their polar factors "
                     "(TSV-Merge), which mergekit has no method for. Below is task arithmetic with the scales β as "
                     "weights.")
    if method.densities and not method.mergekit_density and any(d < 1.0 for d in _all_densities(recipe)):
        notes.append("Not exact: mergekit cannot express the keep ratios α (each expert's LoRA A, or task vector, "
                     "pruned to its largest-magnitude fraction α); this is the merge with every α = 1.")
    weights = _all_weights(recipe)
    if method.disjoint_mean == "count" and (len(set(weights)) > 1 or min(weights) < 0):
        notes.append(f"Not exact: {method.name} divides each agreeing entry by how many experts agree, mergekit's "
                     "TIES by the sum of their weights (β / mean|β| here, lambda the mean|β|); the two agree when "
                     "every β is the same positive number.")
    if method.stochastic:
        notes.append(f"DARE drops entries at random: mergekit draws its own masks (run it with --random-seed "
                     f"{recipe.seed or 0}, the recipe's seed), evomerge seeds each mask by (seed, expert, tensor), "
                     "so the two agree in distribution, not entry by entry. Each weight holds the 1/density rescale "
                     "(rescale: false).")
    aligned = [e for e in recipe.experts if e.endswith(ALIGNED_SUFFIX)]
    if aligned:
        notes.append(f"{aligned[0]}{' and the other @regmean experts' if len(aligned) > 1 else ''} are RegMean-aligned "
                     "copies of the experts (A factors re-fit to the run's fit examples), written under the evomerge "
                     "cache; `evomerge export JOURNAL` writes them again where they are gone.")
    if repository is None:
        notes.append("Experts are named, not located, and block overrides are left out: export with --repository "
                     "for paths and per-tensor filters.")
    if notes:
        notes.append("The exact merge: evomerge export JOURNAL --adapter DIR (LoRA, low-rank methods) or --model DIR.")
    return notes


def _strength(recipe: MergeRecipe) -> float:
    """The strength mergekit's lambda carries: for a disjoint mean over the agreeing count (evo_ties),
    whose β's size is the strength, the mean |β| (the β when all are equal, where the YAML is
    exact); 1 for every other method."""
    if METHODS[recipe.method].disjoint_mean != "count":
        return 1.0
    weights = [abs(w) for w in _all_weights(recipe)]
    return sum(weights) / len(weights) or 1.0


def _all_weights(recipe: MergeRecipe) -> list[float]:
    return [w for ws in (recipe.weights, *(b.weights for b in recipe.blocks)) for w in ws]


def _all_densities(recipe: MergeRecipe) -> list[float]:
    out = list(recipe.densities or ())
    for b in recipe.blocks:
        out += list(b.densities or ())
    return out


def to_mergekit(recipe: MergeRecipe, repository: Repository | None = None, base: str = "BASE_MODEL",
                dtype: str = "float32") -> str:
    """A mergekit YAML config of `recipe` (exact for linear, task arithmetic, uniform and TIES; DARE
    up to its random masks); `repository` gives the paths and tensor names."""
    method = METHODS[recipe.method]
    as_linear = method.weighting == "normalised" and recipe.scale == 1.0
    base_ref = str(repository.base.resolve()) if repository is not None else base
    names = list(repository.base_files) if repository is not None else []
    values = _values(recipe, as_linear)
    models = []
    for i, name in enumerate(recipe.experts):
        ref = name
        if repository is not None:
            expert = repository.expert(name)
            ref = f"{base_ref}+{expert.path.resolve()}" if expert.kind == "lora" else str(expert.path.resolve())
        models.append({"model": ref, "parameters": {k: _setting(recipe, v(i), names) for k, v in values.items()}})
    config: dict[str, Any] = {"merge_method": "linear" if as_linear else method.mergekit}
    if not as_linear:   # mergekit's linear would take a base_model as one more (unweighted) input
        config["base_model"] = base_ref
    config["models"] = models
    if as_linear:
        config["parameters"] = {"normalize": True}
    else:
        config["parameters"] = {"normalize": method.disjoint_mean is not None,
                                "lambda": recipe.scale * _strength(recipe)}
        if method.stochastic:
            config["parameters"]["rescale"] = False
    config["dtype"] = dtype
    text = yaml.safe_dump(config, sort_keys=False)
    notes = _caveats(recipe, repository)
    return "".join(f"# {line}\n" for line in notes) + text


def write_exports(recipe: MergeRecipe, out_dir: str | Path, repository: Repository | None = None,
                  base: str = "BASE_MODEL") -> dict[str, Path]:
    """Write best_recipe.json and mergekit.yaml into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"recipe": out / "best_recipe.json", "mergekit": out / "mergekit.yaml"}
    paths["recipe"].write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    paths["mergekit"].write_text(to_mergekit(recipe, repository, base))
    return paths


def write_model(recipe: MergeRecipe, repository: Repository, adapter: str | Path | None = None,
                model: str | Path | None = None, choose: str | Path | None = None,
                device: str | None = None) -> dict[str, Path]:
    """Write the merged PEFT adapter and/or the merged Hugging Face checkpoint of `recipe`. With
    `choose`, write the one artifact to ship into that folder: ``adapter/`` where the merge stays
    low-rank (and changes something), else the checkpoint in ``model/``."""
    from evomerge.merging import Merger
    from evomerge.merging.save import save_adapter, save_checkpoint

    merger = Merger(repository, device or "cpu")
    try:
        if choose is not None:
            changes = any(recipe.weights) or any(any(b.weights) for b in recipe.blocks)
            if merger.low_rank_refusal(recipe) is None and changes:
                adapter = Path(choose) / "adapter"
            else:
                model = Path(choose) / "model"
        paths = {}
        if adapter is not None:
            paths["adapter"] = save_adapter(merger, recipe, adapter)
        if model is not None:
            paths["model"] = save_checkpoint(merger, recipe, model)
        return paths
    finally:
        merger.close()


def register_on_provider(recipe: MergeRecipe, base_url: str, name: str, api_key: str | None = None,
                         timeout: float = 60.0) -> dict[str, Any]:
    """Register `recipe` on an evomerge provider as the model `name` (POST {base_url}/models);
    returns the provider's model object."""
    from evomerge._imports import require
    from evomerge.errors import BackendError

    httpx = require("httpx", "registering a model on a provider")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        reply = httpx.post(base_url.rstrip("/") + "/models", json={"id": name, "merge": recipe.to_dict()},
                           headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise BackendError(f"cannot reach the provider at {base_url}: {exc}") from None
    if reply.status_code != 200:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text[:200]
        raise BackendError(f"the provider refused to register {name!r} (HTTP {reply.status_code}): {message}")
    return reply.json()


def write_outputs(config: SearchConfig, result: SearchResult, report: TestReport | None, weights: Weights) -> None:
    """What a configured run leaves in `config.output`: its resolved config, the best recipe and its
    mergekit YAML, the test report, and where the weights are here (the local backend) the merged
    adapter or checkpoint that ships."""
    if config.output is None:
        return
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    write_exports(result.best_recipe, out, weights.repository)
    if config.export_model and config.backend == "local" and weights.repository is not None:
        write_model(result.best_recipe, weights.repository, choose=out, device=config.device)
    if report is not None:
        (out / "test_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def run_repository(config: Mapping[str, Any], override: str | Path | None = None,
                   need: bool = False, recipe: MergeRecipe | None = None) -> Repository | None:
    """The repository a journaled run searched, for its exports: `override`, else the config's,
    else the tiny demo zoo where the run used it (built only when `need`, i.e. weights are to be
    written). None when the weights are elsewhere (a remote provider, a python fitness). Where
    `recipe` merges aligned copies of the experts, the aligned repository the run searched (found
    in the evomerge cache, or built again from the run's config)."""
    path = override or config.get("repository")
    if path is None and config.get("backend") in ("local", "api") and not (config.get("api") or {}).get("base"):
        from evomerge.zoo import default_tiny_dir, ensure_tiny
        from evomerge.zoo.builder import is_built

        if need or is_built(default_tiny_dir(), "tiny", 0):
            path = ensure_tiny()
    if path is None:
        if need:
            raise ConfigError("writing the merged weights needs the repository the run searched; give --repository DIR")
        return None
    repo = Repository.open(path)
    if recipe is not None and any(e not in repo.experts for e in recipe.experts):  # the experts' aligned copies
        from evomerge.backends._config import select_experts
        from evomerge.backends.local import searched_repository
        from evomerge.config import SearchConfig
        from evomerge.tasks import load_splits

        run = SearchConfig.model_validate({**config, "repository": str(path)})
        aligned, _ = searched_repository(run, Path(path), repo, select_experts(run.experts, list(repo.experts)),
                                         load_splits(run.task, repo))
        repo = Repository.open(aligned)
    return repo
