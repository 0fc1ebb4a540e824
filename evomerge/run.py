"""From a validated `SearchConfig` to a finished search: the code path the CLI and Ray jobs share.

It builds the experts list, the search space, the evaluator of the configured backend and calls
`evomerge.search`; then writes the outputs (resolved config, best recipe JSON, mergekit YAML, and on the local
backend the merged adapter or checkpoint).
"""

from __future__ import annotations

import importlib
import json
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from evomerge.api import SearchResult, search
from evomerge.baselines import SUMMARY_ABOVE, TestReport, compare_on_test
from evomerge.config import SearchConfig, TaskConfig
from evomerge.errors import ConfigError
from evomerge.export import write_exports, write_model
from evomerge.journal import Journal
from evomerge.repository import Repository
from evomerge.scheduler.race import Race
from evomerge.score import Cost
from evomerge.search_spaces import build_space
from evomerge.tasks import Example, Splits, generation_length, load_jsonl, split_search


@dataclass(frozen=True)
class Prepared:
    """Everything a search needs that depends on the backend."""

    experts: tuple[str, ...]
    fitness: Callable[..., Any] | None = None
    evaluator: Any = None
    repository: Repository | None = None  # where the weights are on this machine (paths for the exports)
    num_layers: int | None = None
    splits: Splits | None = None
    spent: Cost = Cost()  # paid before the journal existed (the api backend's start-up probe)


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


def prepare(config: SearchConfig, stack: ExitStack, resume: bool = False) -> Prepared:
    """Resolve the backend: experts and evaluator (python, local or api). What must outlive the
    search (the embedded provider) is entered on `stack`."""
    if config.backend == "python":
        from evomerge import demo

        fitness = load_fitness(config.fitness) if config.fitness else demo.demo_fitness
        experts = tuple(config.experts or demo.EXPERTS)
        return Prepared(experts, fitness=fitness)
    if config.backend == "local":
        return _prepare_local(config)
    return _prepare_api(config, stack, resume)


def _zoo_default_tasks(root: Path) -> list[str]:
    """A zoo's out-of-domain targets: the demo's task when the config names none."""
    try:
        return list(json.loads((root / "zoo.json").read_text()).get("ood_tasks") or [])[:1]
    except (OSError, ValueError):
        return []


def load_splits(task: TaskConfig, repo: Repository | None) -> Splits:
    """Fit / validation / test examples from repository task names and/or JSONL files."""
    names = task.tasks or ([] if task.files or repo is None or repo.root is None else _zoo_default_tasks(repo.root))
    search_examples: list[Example] = []
    test: list[Example] = []
    for name in names:
        if repo is None or name not in repo.tasks:
            known = ", ".join(sorted(repo.tasks)) if repo is not None else "none (no --repository given)"
            raise ConfigError(f"task {name!r} is not in the repository; known tasks: {known or 'none'}")
        search_examples += load_jsonl(repo.tasks[name]["search"], task=name)
        test += load_jsonl(repo.tasks[name]["test"], task=name)
    for path in task.files:
        search_examples += load_jsonl(path)
    for path in task.test_files:
        test += load_jsonl(path)
    if not search_examples:
        raise ConfigError("no examples to search on: set task.tasks (repository task names) or task.files (JSONL)")
    fit, val = split_search(search_examples, task.validation, task.split_seed)
    if task.max_fit is not None:
        fit = fit[: task.max_fit]
    return Splits(fit, val, tuple(test))


def _repository_dir(config: SearchConfig) -> Path:
    """The configured repository, or the tiny demo zoo (built on first use)."""
    if config.repository is None:
        from evomerge.zoo import ensure_tiny

        return Path(ensure_tiny())
    return Path(config.repository)


def run_repository(config: Mapping[str, Any], override: str | Path | None = None,
                   need: bool = False) -> Repository | None:
    """The repository a journaled run searched, for its exports: `override`, else the config's,
    else the tiny demo zoo where the run used it (built only when `need`, i.e. weights are to be
    written). None when the weights are elsewhere (a remote provider, a python fitness)."""
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
    return Repository.open(path)


def _experts(config: SearchConfig, available: Sequence[str]) -> tuple[str, ...]:
    experts = tuple(config.experts or sorted(available))
    unknown = [e for e in experts if e not in available]
    if unknown:
        raise ConfigError(f"unknown expert(s) {unknown}; the repository has {', '.join(sorted(available)[:10])}"
                          + (" ..." if len(available) > 10 else ""))
    return experts


def _generation_length(config: SearchConfig, splits: Splits, limit: int | None = None) -> int:
    """New tokens generation may take, alike on every split: task.max_new_tokens, else the longest
    answer's `generation_length` over fit, validation and test. Past a provider's `limit`, a run
    that generates is refused here in one line, not by every request."""
    from evomerge.objectives import Objective

    length = config.task.max_new_tokens or generation_length(splits.fit + splits.validation + splits.test)
    tested = Objective({m: 1.0 for m in config.test_metrics})
    generates = Objective.from_config(config.objective).needs_generation or tested.needs_generation
    if limit is not None and length > limit and generates:
        raise ConfigError(f"generation needs {length} new tokens (task.max_new_tokens, or the longest answer), "
                          f"beyond the provider's max_tokens limit of {limit}; set task.max_new_tokens to at most "
                          f"{limit} or shorten the answers")
    return length


def _prepare_api(config: SearchConfig, stack: ExitStack, resume: bool = False) -> Prepared:
    """The api backend: the provider at --api-base, or the reference server started on loopback
    over the repository (default: the tiny demo zoo). The user's examples stay on this side.

    The start-up probe's paid request is counted (`Prepared.spent`, journaled by the search), so
    the journal's ledger equals what the provider served. A resumed run probes with no caps left:
    only the unpaid GET /models runs (its spend may already be at the cap, and the provider answered
    the run that started it)."""
    from evomerge.backends.remote import ApiBackend, ApiEvaluatorFactory
    from evomerge.errors import BudgetExhausted
    from evomerge.objectives import Objective
    from evomerge.serve.protocol import Limits
    from evomerge.spend import UsageCap

    local = config.api.base is None or config.repository is not None
    repo_dir = _repository_dir(config) if local else None
    repo = Repository.open(repo_dir) if repo_dir is not None else None
    splits = load_splits(config.task, repo)
    length = _generation_length(config, splits, Limits().max_tokens)
    base = config.api.base
    if base is None:
        from evomerge.serve.embedded import serving

        print(f"starting the reference provider over {repo_dir} on loopback", flush=True)
        base = stack.enter_context(serving(repo_dir))
    options = (("mode", config.api.mode), ("concurrency", config.api.concurrency),
               ("timeout", config.api.timeout), ("retries", config.api.max_retries), ("chat", config.task.chat),
               ("max_new_tokens", length)) + (() if config.batch_size is None else (("batch_size", config.batch_size),))
    probe = ApiBackend(base, api_key_env=config.api.key_env, provider=config.api.provider, **dict(options))
    try:
        probe.caps = UsageCap(0, 0) if resume else UsageCap(config.max_queries, config.max_tokens)
        try:
            probe.check()
        except BudgetExhausted:  # resumed: the paid part of the probe is skipped
            pass
        experts = _experts(config, probe.experts())
        spent = Cost(probe.caps.queries, probe.caps.tokens)
    finally:
        probe.close()
    options += (("provider", probe.provider),)  # settled: every worker speaks the same profile
    if probe.provider == "llama.cpp":
        from evomerge.backends.llamacpp import space_error

        refused = space_error(config.space.name, config.space.options)
        if refused is not None:
            raise ConfigError(f"{base} is llama.cpp's server: {refused}")
    factory = ApiEvaluatorFactory(base, config.api.key_env, splits, Objective.from_config(config.objective), options)
    layers = repo.block_layers if repo is not None and probe.provider != "llama.cpp" else None  # one scale per adapter
    return Prepared(experts, evaluator=factory, splits=splits, repository=repo, num_layers=layers, spent=spent)


def _prepare_local(config: SearchConfig) -> Prepared:
    from evomerge.backends.local import LocalEvaluatorFactory
    from evomerge.objectives import Objective

    repo_dir = _repository_dir(config)
    repo = Repository.open(repo_dir)
    splits = load_splits(config.task, repo)
    experts = _experts(config, list(repo.experts))
    if config.task.chat:  # refused now in one line, not by every candidate's evaluator
        from evomerge._imports import require
        from evomerge.inference import model_prompt

        model_prompt(require("transformers", "task.chat").AutoTokenizer.from_pretrained(str(repo.base)), "", chat=True)
    batch = {} if config.batch_size is None else {"batch_size": config.batch_size}
    factory = LocalEvaluatorFactory(str(repo_dir), splits, Objective.from_config(config.objective),
                                    device=config.device, dtype=config.dtype,
                                    max_new_tokens=_generation_length(config, splits), chat=config.task.chat,
                                    population=config.population, **batch)
    return Prepared(experts, evaluator=factory, repository=repo, num_layers=repo.block_layers, splits=splits)


def run(config: SearchConfig, resume: bool = False, force: bool = False,
        progress: bool = True) -> tuple[SearchResult, TestReport | None]:
    """Run (or resume) the search `config` describes, score the result and the baselines on the
    test split (where there is one), and write the outputs."""
    with ExitStack() as stack:
        return _run(config, prepare(config, stack, resume), resume, force, progress)


def _run(config: SearchConfig, prepared: Prepared, resume: bool, force: bool,
         progress: bool) -> tuple[SearchResult, TestReport | None]:
    space = build_space(config.space.name, list(prepared.experts), **_space_options(config, prepared))
    if prepared.splits is not None:
        s = prepared.splits
        print(f"searching for {', '.join(s.tasks)}: {len(s.fit)} fit, {len(s.validation)} validation, "
              f"{len(s.test)} test examples; {len(prepared.experts)} experts", flush=True)
    result = search(prepared.fitness, space, evaluator=prepared.evaluator, budget=config.budget,
                    optimizer=config.optimizer, seed=config.seed, journal=config.journal, resume=resume, force=force,
                    workers=config.workers, executor=config.executor, ray_address=config.ray_address,
                    eval_timeout=config.eval_timeout, max_retries=config.max_retries, popsize=config.popsize,
                    optimizer_options=config.optimizer_options, top_k=config.top_k, max_queries=config.max_queries,
                    max_tokens=config.max_tokens, progress=progress, config=config.model_dump(mode="json"),
                    spent=prepared.spent,
                    race=None if config.race is None else Race(**config.race.model_dump()))
    report = _test_table(config, prepared, result)
    if config.output is not None:
        out = Path(config.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
        write_exports(result.best_recipe, out, prepared.repository)
        if config.export_model and config.backend == "local":   # the weights are here: write what ships
            write_model(result.best_recipe, prepared.repository, choose=out, device=config.device)
        if report is not None:
            (out / "test_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return result, report


TEST_STAGE = -1
"""The journal stage of the test table's evaluations (after every search stage)."""


def _test_table(config: SearchConfig, prepared: Prepared, result: SearchResult) -> TestReport | None:
    """The test table (`baselines.compare_on_test`), paid through the same spend ledger as the
    search: each evaluation reserved under the caps that are left, journaled (stage -1), reused on
    resume, and what the table cost reported with it. ``config.test_table`` None: a summary when
    the repository has more than `SUMMARY_ABOVE` experts, else the full table."""
    table = config.test_table or ("summary" if len(prepared.experts) > SUMMARY_ABOVE else "full")
    if table == "none" or prepared.splits is None or not prepared.splits.test:
        return None
    from evomerge.objectives import Objective
    from evomerge.scheduler.ledger import Ledger
    from evomerge.scheduler.loop import Shared, evaluate_once
    from evomerge.scheduler.threads import ThreadExecutor

    searcher = prepared.evaluator
    tester = replace(searcher, objective=Objective({m: 1.0 for m in config.test_metrics}))
    paid = getattr(tester, "bound", None) is not None
    bound = (lambda split: (tester if split == "test" else searcher).bound(split)) if paid else None
    kept = config.journal is not None
    journal = Journal.open(config.journal) if kept else Journal.create(":memory:", {})
    ledger = Ledger(journal, config.max_queries, config.max_tokens, bound,
                    None if kept else result.cost + prepared.spent)
    before = ledger.spent
    resumed = journal.trials(stage=TEST_STAGE)
    pools = {"test": ThreadExecutor(tester), "selection": ThreadExecutor(searcher)}

    def score(items: list[tuple[int, Any]], split: str) -> dict[int, Any]:
        pool = pools["test" if split == "test" else "selection"]
        shared = Shared(pool, journal, ledger, resumed=resumed, paid=paid)
        return {k: t.score for k, t in evaluate_once(shared, TEST_STAGE, items, split).items()}

    try:
        report = compare_on_test(score, result.best_recipe, prepared.experts,
                                 "validation" if prepared.splits.validation else "fit", table)
        report = replace(report, cost=ledger.spent + Cost(-before.queries, -before.tokens))
        journal.set_meta("test_report", report.to_dict())
    finally:
        for pool in pools.values():
            pool.shutdown()
        journal.close()
    return report


def _space_options(config: SearchConfig, prepared: Prepared) -> dict[str, Any]:
    options = dict(config.space.options)
    if config.space.name == "evo_joint" and "num_layers" not in options and prepared.num_layers is not None:
        options["num_layers"] = prepared.num_layers  # its default block stage
    if (config.space.name == "blockwise" or options.get("refine_groups")) and "num_layers" not in options:
        if prepared.num_layers is None:
            raise ConfigError(f"the {config.space.name} space's blocks need space.options.num_layers for this backend")
        options["num_layers"] = prepared.num_layers
    return options
