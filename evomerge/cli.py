"""The `evomerge` command: parse, validate, call the Python API, print one line on error (exit 2)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, EvomergeError


def _search(args: argparse.Namespace) -> int:
    from evomerge.api import run
    from evomerge.config import load_config

    overrides: dict[str, Any] = {}
    for dest in args.config_flags:
        value = getattr(args, dest)
        if value is not None:
            section, _, name = dest.rpartition(".")
            value = [str(v) for v in value] if isinstance(value, list) else value
            (overrides.setdefault(section, {}) if section else overrides)[name] = value
    if args.workers and args.workers > 1 and args.executor is None:
        overrides["executor"] = "ray"
    config = load_config(args.config, overrides)
    result, report = run(config, resume=args.resume, force=args.force, progress=not args.no_progress)
    fit = result.best_loss
    val = result.validation_loss
    print(f"best fit loss {fit:.6g}" + (f", validation loss {val:.6g}" if val is not None else "")
          + f" after {sum(s.evaluations for s in result.stages)} evaluations"
          + (f" ({result.cost.queries} queries, {result.cost.tokens} tokens)" if result.cost.queries else ""))
    print(format_recipe(result.best_recipe))
    if report is not None:
        print(format_test_report(report))
    if config.output is not None:
        print(f"outputs in {config.output}")
    return 0


SECTION_FLAGS: dict[str, tuple[str, str, str]] = {
    "api.base": ("--api-base", "URL", "api backend: the provider's base URL (default: a built-in local server)"),
    "api.provider": ("--provider", "KIND", "api backend: the server's kind (default: auto, asked from the server)"),
    "task.files": ("--task-file", "JSONL", 'your task: {"prompt", "answer"} JSONL lines to search on '
                                  "(fit + validation); repeat for more tasks (a row's task: its task field, else the "
                                  "file's name less a split word, e.g. tasks/NAME/search.jsonl)"),
    "task.test_files": ("--test-file", "JSONL", "held-out JSONL examples for the test table after the search (never "
                                       "searched on)"),
    "race.fraction": ("--race", "FRACTION", "score candidates on this fraction of the fit examples first; "
                                "finish only the promising"),
}
"""Flags for fields inside the config's sections; every scalar or list field at the top gets its own."""


def _add_config_flags(parser: argparse.ArgumentParser) -> list[str]:
    """One flag per field of `SearchConfig` a command line can carry, typed and checked as the field
    is (a positive field takes a positive number), its description the help: the config model is
    the one place a setting is declared (mergekit's MergeOptions does this). Returns the dests."""
    from evomerge.config import SearchConfig

    dests = []
    for name, info in SearchConfig.model_fields.items():
        kwargs = _flag_kwargs(info.annotation, info.metadata, info.default)
        if kwargs is not None:
            negated = info.annotation is bool and info.default
            flag = ("--no-" if negated else "--") + name.replace("_", "-")
            help_text = f"turn off: {info.description}" if negated and info.description else info.description
            parser.add_argument(flag, dest=name, help=help_text, **kwargs)
            dests.append(name)
    for dest, (flag, metavar, help_text) in SECTION_FLAGS.items():
        section, name = dest.split(".")
        model: Any = _optional(SearchConfig.model_fields[section].annotation)  # a section's model class
        if hasattr(model, "model_fields"):
            info = model.model_fields[name]
            annotation, metadata = info.annotation, info.metadata
        else:  # race: a dataclass, which checks its own values
            annotation, metadata = typing.get_type_hints(model)[name], []
        kwargs = _flag_kwargs(annotation, metadata, None) or {}
        if "choices" not in kwargs:
            kwargs["metavar"] = metavar
        parser.add_argument(flag, dest=dest, help=help_text, **kwargs)
        dests.append(dest)
    return dests


def _optional(annotation: Any) -> Any:
    """`X | None` -> X."""
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    return members[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(members) == 1 \
        else annotation


def _flag_kwargs(annotation: Any, metadata: list[Any], default: Any) -> dict[str, Any] | None:
    """argparse keywords for a field of this type and constraints; None: no flag (a mapping or a section)."""
    annotation = _optional(annotation)
    if annotation is bool:
        return {"action": "store_false" if default else "store_true", "default": None}
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if typing.get_origin(annotation) is list:
        return {"action": "append", "type": typing.get_args(annotation)[0]}
    positive = any(getattr(m, "gt", None) == 0 or (getattr(m, "ge", None) or 0) >= 1 for m in metadata)
    if annotation is int:
        return {"type": _positive_int if positive else int}
    if annotation is float:
        return {"type": _positive_float if positive else float}
    if annotation in (str, Path):
        return {"type": annotation}
    return None


RECIPE_ROWS = 24  # a repository of hundreds of experts prints its strongest


def format_recipe(recipe) -> str:
    """The best recipe as a table: each expert's keep ratio α and signed scale β, strongest first."""
    alphas = recipe.densities or (None,) * len(recipe.experts)
    rows = sorted(zip(recipe.experts, alphas, recipe.weights, strict=True), key=lambda r: -abs(r[2]))
    width = max(len("expert"), *(len(name) for name, _, _ in rows[:RECIPE_ROWS]))
    extra = [f"scale {recipe.scale:g}"] if recipe.scale != 1.0 else []
    extra += [f"seed {recipe.seed}"] if recipe.seed is not None else []
    lines = [f"best recipe: {recipe.method}" + "".join(f", {e}" for e in extra),
             f"  {'expert':<{width}}  {'keep α':>8}  {'scale β':>8}"]
    for name, alpha, beta in rows[:RECIPE_ROWS]:
        lines.append(f"  {name:<{width}}  {'—' if alpha is None else f'{alpha:.4f}':>8}  {beta:+8.4f}")
    if len(rows) > RECIPE_ROWS:
        lines.append(f"  ... {len(rows) - RECIPE_ROWS} more, each |β| ≤ {abs(rows[RECIPE_ROWS][2]):.4f}")
    if recipe.blocks:
        lines.append(f"  + {len(recipe.blocks)} block overrides (the whole recipe: evomerge export)")
    return "\n".join(lines)


def format_test_report(report) -> str:
    """The test-split table: the best recipe beside the uniform merge and the experts alone."""
    rows = report.rows
    metrics = sorted({k for row in rows.values() for k in row if k not in ("status", "expert", "error")})
    labels = {name: f"best_single ({row['expert']})" if name == "best_single" else name for name, row in rows.items()}
    width = max(len("test split"), *map(len, labels.values()))
    cost = f" ({report.cost.queries} queries, {report.cost.tokens} tokens)" if report.cost.queries else ""
    lines = [f"test split: {', '.join(report.tasks)}, {report.examples} examples{cost}"] if report.examples else []
    lines.append(f"  {'':<{width}}  " + "  ".join(f"{m:>12}" for m in metrics))
    for name, row in rows.items():
        cells = [f"{row[m]:12.4f}" if isinstance(row.get(m), float) else f"{'—':>12}" for m in metrics]
        why = f"  {row['status']}: {row['error']}" if row.get("error") else ""
        lines.append(f"  {labels[name]:<{width}}  " + "  ".join(cells) + why)
    return "\n".join(lines)


def _report(args: argparse.Namespace) -> int:
    from evomerge.report import write_report

    paths = write_report(args.journal, args.out)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from evomerge.export import register_on_provider, run_repository, write_exports, write_model
    from evomerge.report import load_run

    if args.provider is not None and not args.name:
        raise ConfigError("--provider needs --name, the model id to register the merge under")
    run = load_run(args.journal)
    weights = args.adapter is not None or args.model is not None
    repo = run_repository(run.config, args.repository, need=weights, recipe=run.best.recipe)
    paths = write_exports(run.best.recipe, args.out or Path(args.journal).with_suffix(""), repo, args.base)
    if weights:
        assert repo is not None  # run_repository(need=True) raises a ConfigError rather than give None
        paths.update(write_model(run.best.recipe, repo, args.adapter, args.model, device=args.device))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if args.provider is not None:
        model = register_on_provider(run.best.recipe, args.provider, args.name, os.environ.get(args.api_key_env))
        print(f"provider model: {model['id']} at {args.provider}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (what is wrong and where to look), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"evomerge: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evomerge", description="Black-box evolutionary model merging.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("search", help="search for the best merge of experts")
    s.add_argument("--config", type=Path, help="YAML config file; flags override its fields")
    s.add_argument("--resume", action="store_true", help="continue the run recorded in --journal")
    s.add_argument("--force", action="store_true", help="resume even if the journal's config differs")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(config_flags=_add_config_flags(s))
    s.set_defaults(func=_search)
    r = sub.add_parser("report", help="write a Markdown report with plots from a journal")
    r.add_argument("journal", type=Path)
    r.add_argument("--out", type=Path, help="output directory (default: beside the journal)")
    r.set_defaults(func=_report)
    e = sub.add_parser("export",
                       help="write the best recipe as JSON and mergekit YAML, a PEFT adapter or a merged model")
    e.add_argument("journal", type=Path)
    e.add_argument("--out", type=Path, help="output directory (default: beside the journal)")
    e.add_argument("--base", default="BASE_MODEL",
                   help="base model name for the mergekit YAML when no repository is known")
    e.add_argument("--repository", type=Path, help="the repository the run searched (default: the run's config)")
    e.add_argument("--adapter", type=Path, metavar="DIR",
                   help="write the merge as one PEFT LoRA adapter (low-rank methods)")
    e.add_argument("--model", type=Path, metavar="DIR", help="write the merged Hugging Face checkpoint (any method)")
    e.add_argument("--device", help="merge on this device (default: cpu)")
    e.add_argument("--provider", metavar="URL", help="register the merge as a model on this provider (…/v1)")
    e.add_argument("--name", help="with --provider: the model id to register")
    e.add_argument("--api-key-env", default="EVOMERGE_API_KEY", metavar="VAR",
                   help="with --provider: environment variable holding the provider key (default: %(default)s)")
    e.set_defaults(func=_export)
    from evomerge.serve.cli import register as register_serve
    from evomerge.zoo.cli import register as register_zoo

    register_serve(sub)
    register_zoo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted; the journal keeps every finished evaluation (resume with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
