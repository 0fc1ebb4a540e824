"""Exports of a recipe: JSON (evomerge's own) and a mergekit YAML for the methods both share.

mergekit has no Evo-Merging method; an `evo`/`evo_tv` recipe is exported as the nearest mergekit
merge (task arithmetic of the LoRA-augmented experts, β as weights) and the YAML says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import yaml

from evomerge.blocks import block_of
from evomerge.recipe import MergeRecipe

_MERGEKIT = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare": "dare_linear", "linear": "linear",
             "uniform": "task_arithmetic", "evo": "task_arithmetic", "evo_tv": "task_arithmetic"}


def _value(recipe: MergeRecipe, i: int, field: str, num_layers: int | None) -> Any:
    """A per-expert parameter, as mergekit's filter list where blocks override it."""
    pick = (lambda w, d: w[i]) if field == "weight" else (lambda w, d: None if d is None else d[i])
    default = pick(recipe.weights, recipe.densities)
    if not recipe.blocks or num_layers is None:
        return default
    entries = []
    for layer in range(num_layers):
        for module, kind in (("self_attn", "attn"), ("mlp", "mlp")):
            name = block_of(f"model.layers.{layer}.{module}.x", [b.name for b in recipe.blocks])
            if name is not None:
                value = pick(*recipe.coefficients(name))
                if value is not None:
                    entries.append({"filter": f"layers.{layer}.{module}.", "value": value})
    return entries + [{"value": default}] if entries else default


def to_mergekit(recipe: MergeRecipe, base: str, expert_paths: Mapping[str, str] | None = None,
                lora: bool = False, num_layers: int | None = None, dtype: str = "float32") -> str:
    """A mergekit YAML config of `recipe` (exact for linear, task arithmetic, TIES, DARE)."""
    paths = dict(expert_paths or {})
    models = []
    for i, name in enumerate(recipe.experts):
        path = paths.get(name, name)
        params: dict[str, Any] = {"weight": _value(recipe, i, "weight", num_layers)}
        if recipe.densities is not None and recipe.method in ("ties", "dare"):
            params["density"] = _value(recipe, i, "density", num_layers)
        models.append({"model": f"{base}+{path}" if lora else path, "parameters": params})
    config: dict[str, Any] = {"merge_method": _MERGEKIT[recipe.method], "base_model": base, "models": models,
                              "dtype": dtype}
    if recipe.method in ("task_arithmetic", "ties", "dare", "uniform", "evo", "evo_tv"):
        config["parameters"] = {"normalize": False, "lambda": recipe.scale}
    text = yaml.safe_dump(config, sort_keys=False)
    if recipe.method in ("evo", "evo_tv"):
        text = ("# Approximate: mergekit has no Evo-Merging method. This is task arithmetic with the\n"
                "# signed scales β as weights; the keep ratios α (sparsified LoRA A) are not expressible.\n" + text)
    return text


def write_exports(recipe: MergeRecipe, out_dir: str | Path, base: str = "BASE_MODEL",
                  expert_paths: Mapping[str, str] | None = None, lora: bool = False,
                  num_layers: int | None = None) -> dict[str, Path]:
    """Write best_recipe.json and mergekit.yaml into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"recipe": out / "best_recipe.json", "mergekit": out / "mergekit.yaml"}
    paths["recipe"].write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    paths["mergekit"].write_text(to_mergekit(recipe, base, expert_paths, lora, num_layers))
    return paths
