"""One search, three ways: through llama.cpp's server (β only), through `evomerge serve` (β only),
and through `evomerge serve` with α and β, on the same zoo, examples, budget and seed.

    evomerge zoo build --preset smol-mini --out ZOO && evomerge zoo export-gguf ZOO DIR
    python -m benchmarks.llamacpp_search --zoo ZOO --gguf DIR [--budget 24] [--settings ood indomain] [--keep WORK]

ZOO is a zoo directory, DIR its `evomerge zoo export-gguf` folder. Each run is `evomerge search
--backend api` (`evomerge.api.run`) against a real server on 127.0.0.1: llama.cpp's own
(`evomerge zoo serve-gguf`, a child process) or the reference provider (in this process). Reported
per run: test exact match of the found recipe, the uniform merge and the best single expert (chosen
on validation), each scored through that run's provider, and fit evaluations per second of the
search. Writes a JSON file and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sqlite3
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from evomerge.config import load_config
from evomerge.api import run
from evomerge.tasks import write_jsonl

from benchmarks.quality_setup import load_setting

RUNS = {"llama.cpp β": ("llama.cpp", {"name": "evo_joint", "options": {"schedule": "beta"}}),
        "evomerge β": ("evomerge", {"name": "evo_joint", "options": {"schedule": "beta"}}),
        "evomerge α/β": ("evomerge", {"name": "evo_joint"})}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llamacpp_search", description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--gguf", type=Path, required=True, help="the zoo's export-gguf folder")
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--settings", nargs="+", default=["ood", "indomain"], choices=["ood", "indomain"])
    ap.add_argument("--search-per-task", type=int, nargs=2, default=(24, 8), metavar=("OOD", "INDOMAIN"))
    ap.add_argument("--test-per-task", type=int, nargs=2, default=(24, 12), metavar=("OOD", "INDOMAIN"))
    ap.add_argument("--validation", type=float, default=0.33)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="api.timeout, seconds per request (a loaded machine can need more for evomerge serve)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/llamacpp_search.json"))
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep each run's journal, the example files and llama.cpp's log here (default: a temporary folder)")
    return ap.parse_args(argv)


@contextlib.contextmanager
def provider(kind: str, zoo: Path, gguf: Path, log: Path) -> Iterator[str]:
    """A real server of `kind` on 127.0.0.1; yields its /v1 URL."""
    if kind == "llama.cpp":
        from tests.helpers.llamacpp_server import LlamaServer

        with LlamaServer(gguf, log) as server:
            yield server.url
    else:
        from evomerge.serve.embedded import serving

        with serving(zoo) as url:
            yield url


def one_run(args: argparse.Namespace, name: str, setting: Any, files: tuple[Path, Path], work: Path) -> dict:
    kind, space = RUNS[name]
    with provider(kind, args.zoo, args.gguf, work / "llama.log") as url:
        config = load_config(None, {
            "backend": "api", "api": {"base": url, "provider": kind, "concurrency": args.concurrency,
                                      "timeout": args.timeout},
            "budget": args.budget, "seed": 0, "experts": list(setting.experts), "space": space, "top_k": 3,
            "task": {"files": [str(files[0])], "test_files": [str(files[1])], "validation": args.validation},
            "test_table": "summary", "journal": str(work / f"{setting.name}-{len(list(work.glob('*.sqlite')))}.sqlite")})
        started = time.perf_counter()
        result, report = run(config, progress=False)
        seconds = time.perf_counter() - started
    evaluations, search_seconds = search_rate(Path(config.journal))
    rows = report.rows if report is not None else {}
    return {"run": name, "setting": setting.name, "tasks": list(setting.tasks), "experts": list(setting.experts),
            "evaluations": evaluations, "queries": result.cost.queries, "tokens": result.cost.tokens,
            "search_seconds": round(search_seconds, 1), "wall_seconds_with_test": round(seconds, 1),
            "evaluations_per_second": round(evaluations / search_seconds, 3),
            "test_exact_match": {k: rows.get(k, {}).get("exact_match") for k in ("best", "uniform", "best_single")},
            "best_single": report.best_single if report is not None else None,
            "recipe": result.best_recipe.to_dict()}


def search_rate(journal: Path) -> tuple[int, float]:
    """(paid fit evaluations, seconds from the journal's creation to the last of them)."""
    with sqlite3.connect(journal) as conn:
        opened = float(conn.execute("SELECT value FROM meta WHERE key = 'created'").fetchone()[0])
        count, last = conn.execute("SELECT COUNT(*), MAX(created) FROM evaluations "
                                   "WHERE split = 'fit' AND cached = 0 AND stage >= 0").fetchone()
    return int(count), float(last) - opened


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    results = []
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    folder = contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(prefix="llamacpp-search-")
    with folder as tmp:
        for name in args.settings:
            index = ["ood", "indomain"].index(name)
            search_n, test_n = args.search_per_task[index], args.test_per_task[index]
            setting = load_setting(args.zoo, name, search_n, test_n, args.validation)
            files = (Path(tmp) / f"{name}-search.jsonl", Path(tmp) / f"{name}-test.jsonl")
            write_jsonl(files[0], setting.splits.fit + setting.splits.validation)
            write_jsonl(files[1], setting.splits.test)
            for run_name in args.runs:
                results.append(one_run(args, run_name, setting, files, Path(tmp)))
                print(json.dumps(results[-1]), flush=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "budget": args.budget, "timeout": args.timeout, "zoo": str(args.zoo),
            "search_per_task": args.search_per_task, "test_per_task": args.test_per_task}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print("| setting | run | test EM found | uniform | best single | evaluations/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        em = r["test_exact_match"]
        cells = [f"{em[k]:.3f}" if isinstance(em[k], float) else "–" for k in ("best", "uniform", "best_single")]
        print(f"| {r['setting']} | {r['run']} | {' | '.join(cells)} | {r['evaluations_per_second']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
