"""How well Ray workers keep busy: parallel efficiency and utilisation on an I/O-bound fitness.

The fitness is a real HTTP request to a loopback endpoint that answers after a delay (what an
LMaaS provider looks like from the search). Two measurements:

1. throughput with 1, 2, 4, 8 workers at a fixed delay, as parallel efficiency
   rate(N) / (N × rate(1)), the single-worker rate measured in the same run;
2. worker utilisation, busy time / (workers × wall), when delays vary 10× (uniform in
   [50, 500] ms), so a fast worker must take the next candidate without waiting for slow ones:
   once with every evaluation submitted at once (the executor alone), and through
   `evomerge.search` (CMA-ES asking ahead within its lookahead window, telling in ask order).

Run from the repository root:  python -m benchmarks.ray_throughput
Start-up (Ray, actor processes) is excluded: each executor is timed from its first submit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import evomerge
from evomerge.recipe import MergeRecipe
from evomerge.scheduler.ray_executor import RayExecutor, connect
from evomerge.scheduler.threads import ThreadExecutor
from evomerge.search_spaces import build_space
from tests.helpers.ray_fitness import DelayServer, HttpFactory


def _recipe(i: int, delay: float | None = None) -> MergeRecipe:
    meta = {} if delay is None else {"delay": delay}
    return MergeRecipe("linear", ("a", "b"), (0.01 * i, 1.0), meta=meta)


def run_batch(executor: RayExecutor, recipes: list[MergeRecipe]) -> tuple[float, float]:
    """Submit all, wait for all; (wall seconds, summed busy seconds of the evaluations)."""
    start = time.perf_counter()
    scores = [f.result() for f in [executor.submit(r, "fit") for r in recipes]]
    wall = time.perf_counter() - start
    failed = [s.error for s in scores if not s.ok]
    if failed:
        raise SystemExit(f"{len(failed)} evaluations failed, first: {failed[0]}")
    return wall, sum(s.metrics["end"] - s.metrics["start"] for s in scores)


def throughput(url: str, counts: list[int], per_worker: int) -> list[tuple[int, float, float]]:
    """(workers, evaluations/s, efficiency) for each worker count."""
    rows, single = [], None
    for n in counts:
        with RayExecutor(HttpFactory(url), workers=n) as executor:
            executor.wait_ready()
            run_batch(executor, [_recipe(i) for i in range(n)])  # warm the connections
            wall, _ = run_batch(executor, [_recipe(i) for i in range(n * per_worker)])
        rate = n * per_worker / wall
        single = single or (rate if n == 1 else None)
        rows.append((n, rate, rate / (n * single) if single else float("nan")))
        print(f"  workers={n}: {rate:.2f} eval/s", flush=True)
    return rows


def utilisation(url: str, workers: int, jobs: int, low: float, high: float, seed: int) -> tuple[float, float]:
    """(utilisation, wall seconds) with delays uniform in [low, high]."""
    rng = random.Random(seed)
    recipes = [_recipe(i, rng.uniform(low, high)) for i in range(jobs)]
    with RayExecutor(HttpFactory(url), workers=workers) as executor:
        executor.wait_ready()
        wall, busy = run_batch(executor, recipes)
    return busy / (workers * wall), wall


def utilisation_search(url: str, workers: int, budget: int, lookahead: int | None, seed: int) -> tuple[float, float, float, int]:
    """(utilisation, end-to-end utilisation, wall seconds, window) of `evomerge.search` itself
    (CMA-ES over 8 experts, a SQLite journal), each recipe's delay drawn from the endpoint's
    spread. Utilisation spans first evaluation start to last end; end to end also counts the
    search's set-up (journal, optimizer) and the executor's shutdown."""
    space = build_space("linear", [f"e{i}" for i in range(8)])
    with tempfile.TemporaryDirectory() as tmp, RayExecutor(HttpFactory(url), workers=workers) as executor:
        executor.wait_ready()
        # Warm up: the first search in a process pays the optimizer's imports (seconds here).
        evomerge.search(space=space, evaluator=HttpFactory(url), budget=2, seed=seed + 1, executor=ThreadExecutor(HttpFactory(url)))
        start = time.time()
        result = evomerge.search(space=space, evaluator=HttpFactory(url), budget=budget, seed=seed,
                                 workers=workers, executor=executor, lookahead=lookahead,
                                 journal=Path(tmp, "run.sqlite"))
        end = time.time()
    paid = [t for t in result.trials if not t.cached]
    if len(paid) != budget or not all(t.ok for t in paid):
        raise SystemExit(f"the search paid {len(paid)} evaluations of {budget}, or some failed")
    busy = sum(t.score.metrics["end"] - t.score.metrics["start"] for t in paid)
    span = max(t.score.metrics["end"] for t in paid) - min(t.score.metrics["start"] for t in paid)
    window = lookahead or max(4 + int(3 * math.log(8)), 2 * workers)
    return busy / (workers * span), busy / (workers * (end - start)), span, window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.2, help="fixed endpoint delay (s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--per-worker", type=int, default=15, help="evaluations per worker")
    parser.add_argument("--util-workers", type=int, default=8)
    parser.add_argument("--util-jobs", type=int, default=160)
    parser.add_argument("--search-budget", type=int, default=160)
    parser.add_argument("--lookahead", type=int, nargs="+", default=[0], help="search windows (0: the default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    print(f"# ray_throughput {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    connect()  # one local Ray (or RAY_ADDRESS) for every executor below
    with DelayServer(args.delay) as server:
        rows = throughput(server.url, args.workers, args.per_worker)
        util, wall = utilisation(server.url, args.util_workers, args.util_jobs, 0.05, 0.5, args.seed)
    with DelayServer(args.delay, spread=(0.05, 0.5)) as server:
        searches = [utilisation_search(server.url, args.util_workers, args.search_budget, la or None, args.seed)
                    for la in args.lookahead]
    print(f"\nI/O-bound fitness, {args.delay * 1000:.0f} ms per evaluation, {args.per_worker} per worker")
    print("| workers | eval/s | efficiency vs N × 1-worker rate |\n|---|---|---|")
    for n, rate, eff in rows:
        print(f"| {n} | {rate:.2f} | {eff:.1%} |")
    print(f"\nutilisation, {args.util_workers} workers, {args.util_jobs} evaluations, delays uniform in "
          f"[50, 500] ms: {util:.1%} (wall {wall:.1f} s; all submitted at once to the executor)")
    for util, end_to_end, wall, window in searches:
        print(f"utilisation through evomerge.search (CMA-ES, journal), {args.util_workers} workers, "
              f"budget {args.search_budget}, lookahead {window}, delays uniform in [50, 500] ms: "
              f"{util:.1%} (span {wall:.1f} s; {end_to_end:.1%} end to end, counting set-up and shutdown)")


if __name__ == "__main__":
    main()
