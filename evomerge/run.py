"""From a validated `SearchConfig` to a finished search: the code path the CLI and Ray jobs share.

It builds the experts list, the search space, the evaluator of the configured backend and calls
`evomerge.search`; then writes the outputs (resolved config, best recipe JSON, mergekit YAML).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from evomerge.api import SearchResult, search
from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.export import write_exports
from evomerge.search_spaces import build_space


@dataclass(frozen=True)
class Prepared:
    """Everything a search needs that depends on the backend."""

    experts: tuple[str, ...]
    fitness: Callable[..., Any] | None = None
    evaluator: Any = None
    base: str = "BASE_MODEL"
    expert_paths: dict[str, str] | None = None
    lora: bool = False
    num_layers: int | None = None


def load_fitness(spec: str) -> Callable[..., Any]:
    """Import 'module:callable' (the module may be a path to a .py file)."""
    if ":" not in spec:
        raise ConfigError(f"--fitness {spec!r} must look like MODULE:CALLABLE, e.g. mypkg.fitness:loss")
    module_name, attr = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            spec_obj = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec_obj is None or spec_obj.loader is None:
                raise ImportError(f"cannot load {module_name}")
            module = importlib.util.module_from_spec(spec_obj)
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, OSError) as exc:
        raise ConfigError(f"cannot import fitness module {module_name!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{module_name!r} has no callable {attr!r}; check the --fitness MODULE:CALLABLE")
    return fn


def prepare(config: SearchConfig) -> Prepared:
    """Resolve the backend: experts and evaluator (python, local or api)."""
    if config.backend == "python":
        from evomerge import demo

        fitness = load_fitness(config.fitness) if config.fitness else demo.demo_fitness
        experts = tuple(config.experts or demo.EXPERTS)
        return Prepared(experts, fitness=fitness)
    raise ConfigError(f"backend {config.backend!r} is not available in this build")


def run(config: SearchConfig, resume: bool = False, force: bool = False, progress: bool = True) -> SearchResult:
    """Run (or resume) the search `config` describes and write its outputs."""
    prepared = prepare(config)
    space = build_space(config.space.name, list(prepared.experts), **_space_options(config, prepared))
    result = search(prepared.fitness, space, evaluator=prepared.evaluator, budget=config.budget,
                    optimizer=config.optimizer, seed=config.seed, journal=config.journal, resume=resume, force=force,
                    workers=config.workers, executor=config.executor, ray_address=config.ray_address,
                    eval_timeout=config.eval_timeout, max_retries=config.max_retries, popsize=config.popsize,
                    optimizer_options=config.optimizer_options, top_k=config.top_k, max_queries=config.max_queries,
                    max_tokens=config.max_tokens, progress=progress, config=config.model_dump(mode="json"))
    if config.output is not None:
        out = Path(config.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
        write_exports(result.best_recipe, out, prepared.base, prepared.expert_paths, prepared.lora, prepared.num_layers)
    return result


def _space_options(config: SearchConfig, prepared: Prepared) -> dict[str, Any]:
    options = dict(config.space.options)
    if config.space.name == "blockwise" and "num_layers" not in options:
        if prepared.num_layers is None:
            raise ConfigError("the blockwise space needs space.options.num_layers for this backend")
        options["num_layers"] = prepared.num_layers
    return options
