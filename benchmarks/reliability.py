"""Reliability figures: kill -9 points survived, fault rates survived, fuzz cases tried, Ray
workers killed, and whether anything was lost. The same machinery as tests/faults, at scale.

    python -m benchmarks.reliability [--kills 24] [--kill-budget 300] [--rates 0.1 0.3]
        [--fault-budget 30] [--fuzz-examples 25] [--ray-budget 60] [--ray-kills 5] [--json FILE]
        [--skip crash,faults,fuzz,ray]

Prints a Markdown report (the tables of RELIABILITY.md); --json also writes the raw figures.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import api_search, crash
from tests.helpers.fuzz import fuzz
from tests.helpers.bpe import build_tiny_repository
from tests.helpers.provider import start_server

SEED = 5


def crash_campaign(root: Path, kills: int, budget: int) -> dict[str, Any]:
    """`kills` random kill points (cycling evaluation / commit), each resumed."""
    ref = crash.reference_run(root / "reference.sqlite", budget, SEED)
    points = []
    for i, (kind, after) in enumerate(crash.random_points(kills, budget, 2026)):
        path = root / f"kill{i}.sqlite"
        start = time.perf_counter()
        point = crash.kill_during(path, budget, SEED, kind, after)
        done = crash.resume(path, budget, SEED, ref)
        points.append({"kind": kind, "after": after, "budget": budget, "committed_at_kill": point.committed, "survived": done.ok(budget),
                       "paid": done.paid, "duplicates": done.duplicates, "kept": done.kept,
                       "same_evaluations": done.same_evaluations, "same_best": done.same_best,
                       "integrity": [done.integrity_before, done.integrity_after],
                       "seconds": round(time.perf_counter() - start, 1)})
        print(f"  kill {i + 1}/{kills}: {kind} after {after}, {point.committed} committed, "
              f"{'survived' if done.ok(budget) else 'LOST SOMETHING'}", flush=True)
    return {"budget": budget, "points": points}


def fault_campaign(server: Any, key: str, root: Path, rates: list[float], budget: int) -> list[dict[str, Any]]:
    runs = []
    for i, (rate, cap) in enumerate([(r, None) for r in rates] + [(max(rates), budget)]):
        start = time.perf_counter()
        run = api_search.search_through_faults(server.base_url, key, root / f"faults{i}.sqlite", rate, budget * (
            3 if cap else 1), seed=i, max_queries=cap)
        keys = [r[:3] for r in run.rows]
        runs.append({"rate": rate, "budget": run.budget, "max_queries": cap, "evaluations": run.paid,
                     "failed": run.failed, "failed_without_error": sum(1 for r in run.rows if r[3] == "failed" and not r[4]),
                     "duplicates": len(keys) - len(set(keys)), "journal_queries": run.queries,
                     "forwarded": run.forwarded, "served": run.served, "faults": run.faults,
                     "failures": dict(collections.Counter(_reason(r[4]) for r in run.rows if r[3] == "failed")),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"  faults {rate:.0%}{f' cap {cap}' if cap else ''}: {run.paid} evaluations, {run.failed} failed, "
              f"{run.queries} queries journaled, {run.forwarded} forwarded", flush=True)
    return runs


def _reason(error: str | None) -> str:
    """The kind of a failure: the cap, or the last transient error after the retries ran out."""
    text = error or "no error text"
    if "BudgetExhausted" in text:
        return "query cap"
    return text.rsplit("last: ", 1)[-1].split(":", 1)[0].removeprefix("provider answered ")


def fuzz_campaign(server: Any, key: str, examples: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    probe = {"prompt": "Question: sky? Answer: blue", "max_tokens": 0, "echo": True, "logprobs": 0,
             "merge": {"method": "evo", "experts": ["math", "colour"], "weights": [0.7, -0.3]}}

    def answer() -> list[float]:
        return httpx.post(server.base_url + "/completions", headers=headers, json=probe, timeout=60).json()[
            "choices"][0]["logprobs"]["token_logprobs"]

    before = answer()
    start = time.perf_counter()
    stats = fuzz(server.base_url.removesuffix("/v1"), headers, examples, seed=SEED)
    after = answer()
    return {"cases": stats.cases, "statuses": dict(sorted(stats.statuses.items())), "server_errors": stats.failures,
            "answers_unchanged": max(abs(a - b) for a, b in zip(before[1:], after[1:])) < 1e-6,
            "seconds": round(time.perf_counter() - start, 1)}


def ray_campaign(root: Path, budget: int, kills: int) -> dict[str, Any]:
    import ray

    from evomerge.journal import Journal
    from evomerge.scheduler.ray_executor import worker_pythonpath
    from tests.helpers.ray_kills import search_with_kills

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with worker_pythonpath(str(crash.ROOT)):
        ray.init(num_cpus=8, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="evr-", dir="/tmp"),
                 log_to_driver=False)
    try:
        start = time.perf_counter()
        result, killer = search_with_kills(root / "ray.sqlite", budget, kills, seed=SEED)
        with Journal.open(root / "ray.sqlite") as journal:
            trials = journal.trials(split="fit")
            paid = journal.count("fit")
        return {"budget": budget, "workers": 3, "killed": len(killer.killed), "evaluations": paid,
                "distinct_trials": len({t.trial for t in trials}), "failed": sum(1 for t in trials if not t.ok),
                "best_loss": result.best_loss, "seconds": round(time.perf_counter() - start, 1)}
    finally:
        ray.shutdown()


def markdown(figures: dict[str, Any]) -> str:
    lines = [f"Run {figures['date']} on {figures['machine']}.", ""]
    if "crash" in figures:
        pts = figures["crash"]["points"]
        by = collections.defaultdict(lambda: [0, 0])
        for p in pts:
            by[p["kind"]][0] += 1
            by[p["kind"]][1] += p["survived"]
        lines += ["### kill -9, then --resume", f"budget {figures['crash']['budget']} per run", "",
                  "| kill point | tried | survived | runs that lost an evaluation | double-counted | same best |", "|---|---|---|---|---|---|"]
        for kind, (tried, ok) in by.items():
            mine = [p for p in pts if p["kind"] == kind]
            lines.append(f"| {kind} | {tried} | {ok} | {sum(1 for p in mine if not p['kept'] or p['paid'] < p['budget'])}"
                         f" | {sum(p['duplicates'] for p in mine)} | {sum(p['same_best'] for p in mine)}/{tried} |")
        lines.append("")
    if "faults" in figures:
        lines += ["### api searches through the fault proxy", "",
                  "| fault rate | cap | evaluations | failed (all with error): why | duplicates | journal queries "
                  "| forwarded to provider | provider served | faults injected |", "|---|---|---|---|---|---|---|---|---|"]
        for r in figures["faults"]:
            injected = ", ".join(f"{k} {v}" for k, v in sorted(r["faults"].items()) if k != "ok")
            lines.append(f"| {r['rate']:.0%} | {r['max_queries'] or '—'} | {r['evaluations']}/{r['budget']} | "
                         f"{r['failed']} ({'yes' if not r['failed_without_error'] else 'NO'})"
                         f"{': ' + ', '.join(f'{k} {v}' for k, v in r['failures'].items()) if r['failures'] else ''} | "
                         f"{r['duplicates']} | "
                         f"{r['journal_queries']} | {r['forwarded']} | {r['served']} | {injected} |")
        lines.append("")
    if "fuzz" in figures:
        f = figures["fuzz"]
        lines += ["### schemathesis fuzzing of the provider", "",
                  f"{f['cases']} cases; statuses {f['statuses']}; server errors {len(f['server_errors'])}; "
                  f"answers unchanged afterwards: {f['answers_unchanged']} ({f['seconds']} s)", ""]
    if "ray" in figures:
        r = figures["ray"]
        lines += ["### Ray workers SIGKILLed mid-search", "",
                  f"{r['killed']} worker processes SIGKILLed ({r['workers']} worker slots); {r['evaluations']}/{r['budget']} "
                  f"evaluations journaled, {r['distinct_trials']} distinct trials, {r['failed']} failed "
                  f"({r['seconds']} s)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--kill-budget", type=int, default=300)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--fault-budget", type=int, default=30)
    parser.add_argument("--fuzz-examples", type=int, default=25)
    parser.add_argument("--ray-budget", type=int, default=60)
    parser.add_argument("--ray-kills", type=int, default=5)
    parser.add_argument("--skip", default="", help="comma-separated: crash, faults, fuzz, ray")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    figures: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}"}
    with tempfile.TemporaryDirectory(prefix="evomerge-reliability-") as tmp:
        root = Path(tmp)
        if "crash" not in skip:
            print("crash campaign", flush=True)
            figures["crash"] = crash_campaign(root, args.kills, args.kill_budget)
        if not {"faults", "fuzz"} <= skip:
            key = "sk-bench-" + secrets.token_hex(8)
            server = start_server(build_tiny_repository(root / "repo"), api_key=key)
            try:
                if "faults" not in skip:
                    print("fault campaign", flush=True)
                    figures["faults"] = fault_campaign(server, key, root, args.rates, args.fault_budget)
                if "fuzz" not in skip:
                    print("fuzz campaign", flush=True)
                    figures["fuzz"] = fuzz_campaign(server, key, args.fuzz_examples)
            finally:
                server.stop()
        if "ray" not in skip:
            print("ray campaign", flush=True)
            figures["ray"] = ray_campaign(root, args.ray_budget, args.ray_kills)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(markdown(figures))


if __name__ == "__main__":
    main()
