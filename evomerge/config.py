"""The search configuration: frozen pydantic models, the single source of truth.

A YAML file fills them; CLI flags override their fields; a run writes the resolved config beside
its outputs and into its journal. Validation happens here, before any work starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge.errors import ConfigError
from evomerge.scheduler.race import Race


class _Frozen(BaseModel):
    # attribute docstrings become field descriptions: the CLI's help text (evomerge.cli)
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class SpaceConfig(_Frozen):
    """Default: α and β searched together in the task-vector form, from the uniform merge (issue 8:
    the paper's two stages at β = 1/N barely move α when N is large). The paper's plan: name "evo"."""

    name: str = "evo_joint"
    options: dict[str, Any] = Field(default_factory=dict)


class TaskConfig(_Frozen):
    """Examples of the user's task: repository task names (zoo) and/or JSONL files.

    ``max_new_tokens`` overrides the generation length derived from the longest answer of every
    split (`evomerge.tasks.generation_length`); ``chat`` wraps each prompt in the tokenizer's chat
    template as a user turn, for instruct models, in the local and api backends alike."""

    tasks: list[str] = Field(default_factory=list)
    files: list[Path] = Field(default_factory=list)
    test_files: list[Path] = Field(default_factory=list)
    validation: float = Field(0.25, ge=0.0, lt=1.0)
    max_fit: int | None = Field(None, gt=0)
    split_seed: int = 0
    max_new_tokens: int | None = Field(None, gt=0)
    chat: bool = False


class ObjectiveConfig(_Frozen):
    """Default: a quarter of the cross-entropy plus (1 − exact match), each divided per task by the
    base model's loss on it. CE alone falls while the metric users read gets worse (issue 8), and
    normalising makes several tasks weigh alike. Exact match leads: CMA-ES ranks candidates, so
    where exact match is flat CE orders them whatever its weight, and the weight only sets how much
    CE a task's answers turning right may cost (at equal weights, the tiny zoo's in-domain searches
    kept a base-like 0.18 nats on ``first_letter`` over its answers: 0.013 test exact match against
    0.170 at a quarter; benchmarks/RESULTS.md). ``greedy_match`` is the cheap alternative (no
    generation), but it is exact at the token level where exact match forgives case and spacing;
    measured on smol ``upper_first``, a search on it lowered CE and lost exact match
    (benchmarks/QUALITY.md). ``ce_stop`` (local backend) scores the answer's end too."""

    metric: str | dict[str, float] = Field(default_factory=lambda: {"ce": 0.25, "exact_match": 1.0})
    aggregate: Literal["mean", "normalized", "worst"] = "normalized"


class ApiConfig(_Frozen):
    base: str | None = None
    key_env: str = "EVOMERGE_API_KEY"
    concurrency: int = Field(8, ge=1)
    timeout: float = Field(30.0, gt=0)
    max_retries: int = Field(4, ge=0)
    mode: Literal["logprobs", "session"] = "logprobs"
    provider: Literal["auto", "evomerge", "llama.cpp"] = "auto"
    """The server's profile: the reference provider (full recipes) or llama.cpp's server (adapter
    scales, β only; `evomerge.backends.llamacpp`); auto asks the server (llama.cpp answers /props)."""


class SearchSettings(_Frozen):
    """What `evomerge.api.optimize` runs, validated once, here. Its dump less `RUNTIME` is the
    journal's fingerprint: a resumed run must search the same way, but may run it differently
    (more workers, another cluster, a raised cap)."""

    budget: int = Field(500, gt=0)
    """paid evaluations (exact)"""
    optimizer: str = "cma"
    """cma, ngopt, ng-cma, twopointsde, pso, oneplusone, random"""
    optimizer_options: dict[str, Any] = Field(default_factory=dict)
    popsize: int | None = Field(None, ge=2)
    """candidates per optimizer generation (default: the optimizer's own)"""
    seed: int = 0
    lookahead: int | None = Field(None, ge=1)
    """candidates asked ahead of the results (default: max(popsize, 2 × workers))"""
    top_k: int = Field(5, ge=1)
    """candidates per stage re-scored on validation before the choice"""
    start: bool = True
    """each stage's first trial is its start point (the uniform merge for the evo spaces)"""
    race: Race | None = None
    """score candidates on a fraction of the fit examples first; finish only the promising"""
    workers: int = Field(1, ge=1)
    """evaluations in parallel (Ray actors when > 1)"""
    executor: Literal["threads", "ray"] = "threads"
    ray_address: str | None = None
    """connect to this Ray cluster (default: $RAY_ADDRESS or a local Ray)"""
    eval_timeout: float | None = Field(None, gt=0)
    """seconds before a candidate is cancelled as failed"""
    max_retries: int = Field(2, ge=0)
    """times a candidate whose Ray worker died is retried"""
    max_queries: int | None = Field(None, gt=0)
    """cap on provider queries (never exceeded)"""
    max_tokens: int | None = Field(None, gt=0)
    """cap on tokens (never exceeded)"""

    RUNTIME: ClassVar[frozenset[str]] = frozenset(
        {"workers", "executor", "ray_address", "eval_timeout", "max_retries", "max_queries", "max_tokens"})

    def fingerprint(self) -> dict[str, Any]:
        """The settings that fix which candidates are asked, as the journal records them."""
        return self.model_dump(mode="json", include=set(SearchSettings.model_fields) - self.RUNTIME)

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        from evomerge.optimizers import OPTIMIZERS

        if name.lower() not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(sorted(OPTIMIZERS))}")
        return name.lower()


class SearchConfig(SearchSettings):
    """A whole run: the search's settings plus where its candidates are scored and what it writes."""

    backend: Literal["python", "local", "api"] = "python"
    """where candidates are scored: a fitness callable, merges in memory, or a provider's API"""
    journal: Path | None = None
    """SQLite journal of the run (needed to resume)"""
    output: Path | None = None
    """directory for the best recipe, mergekit YAML, config and (local backend) the merged adapter or checkpoint"""
    export_model: bool = True
    """Local backend: also write the merged adapter (or checkpoint) into `output`."""
    fitness: str | None = None
    """python backend: MODULE:CALLABLE returning a loss (default: built-in demo)"""
    repository: Path | None = None
    """local/api backends: the repository directory (default: the tiny demo zoo)"""
    experts: list[str] | None = None
    """the experts to merge (default: every expert of the repository)"""
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    test_metrics: list[str] = Field(default_factory=lambda: ["ce", "exact_match"], min_length=1)
    """Metrics reported on the test split (configured apart from the search objective)."""
    test_table: Literal["none", "summary", "full"] | None = None
    """The test table after the search, paid under the same caps: ``full`` (best, uniform, every
    expert alone, best single), ``summary`` (best, uniform, best single), ``none``; None: summary
    beyond 16 experts, else full."""
    device: str | None = None
    """local backend: the device to merge and score on (default: cuda when present, else cpu)"""
    dtype: str | None = None
    """local backend: the scoring dtype, e.g. bfloat16 (default: the model's)"""
    batch_size: int | None = Field(None, ge=1)
    """Examples per forward pass (local) or per request (api); None: the backend's default."""
    population: bool = True
    """Local backend: candidates asked ahead together share batched forwards (LoRA recipes that
    stay low-rank; each row block served by its candidate's factors); false scores one at a time."""
    align: Literal["auto", "regmean", "none"] = "auto"
    """Local backend: also search RegMean-aligned copies of the experts (each LoRA A factor re-fit to
    the fit inputs of the task it serves, `evomerge.merging.regmean`), half the budget each beside
    the experts as they are: ``auto`` where every expert is a LoRA adapter and fit spans two tasks
    or more, ``regmean`` to insist, ``none`` for the experts as they are only."""

    @field_validator("test_metrics")
    @classmethod
    def _known_metrics(cls, metrics: list[str]) -> list[str]:
        from evomerge.objectives import METRICS

        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown test metric(s) {unknown}; choose from {', '.join(METRICS)}")
        return metrics

    @field_validator("space")
    @classmethod
    def _known_space(cls, space: SpaceConfig) -> SpaceConfig:
        from evomerge.search_spaces import SPACES

        if space.name not in SPACES:
            raise ValueError(f"unknown search space {space.name!r}; choose one of {', '.join(sorted(SPACES))}")
        return space


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> SearchConfig:
    """Read a YAML config (or none), apply `overrides` (flags set on the command line), validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a UTF-8 text file; give a YAML config") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: malformed YAML ({getattr(exc, 'problem', None) or exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config must be a YAML mapping of settings, not a {type(loaded).__name__}")
        data = dict(loaded or {})
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}  # a flag overrides one field of a section
        elif value is not None:
            data[key] = value
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, str(path or "config"))) from None


def describe_error(exc: ValidationError, source: str) -> str:
    """A validation error as one line: where it came from, the field, what is wrong, what was given."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    given = err["type"] not in ("missing", "extra_forbidden") and not isinstance(err["input"], dict)
    return f"{source}: {where}: {msg}" + (f" (got {err['input']!r})" if given else "")
