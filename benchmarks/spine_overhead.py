"""Per-candidate overhead of the spine (ask, decode, evaluate hand-off, journal commit, tell) on a
no-op fitness, against a bare pycma ask/tell loop in the same run; and resume time of a
10,000-evaluation journal.

    python -m benchmarks.spine_overhead [--evals 3000] [--resume-evals 10000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cma
import numpy as np

import evomerge
from evomerge.demo import EXPERTS
from evomerge.search_spaces import build_space


def noop(recipe) -> float:
    return 0.0 if recipe is None else float(recipe.weights[0] ** 2)


def bare_cma(evals: int, dim: int) -> tuple[float, float]:
    """Wall and CPU seconds per candidate of pycma's own ask/tell, same dimension and population."""
    es = cma.CMAEvolutionStrategy(np.full(dim, 0.5), 0.05, {"bounds": [0, 1], "seed": 1, "verbose": -9})
    start, cpu, done = time.perf_counter(), time.process_time(), 0
    while done < evals:
        xs = es.ask()
        es.tell(xs, [float(x[0] ** 2) for x in xs])
        done += len(xs)
    return (time.perf_counter() - start) / done, (time.process_time() - cpu) / done


def spine(evals: int, journal: Path | None) -> tuple[float, float]:
    """Wall and CPU seconds per candidate of a whole search (ask, decode, hand-off, commit, tell)."""
    space = build_space("evo_joint", list(EXPERTS))
    start, cpu = time.perf_counter(), time.process_time()
    evomerge.search(noop, space, budget=evals, seed=1, journal=journal, top_k=1)
    return (time.perf_counter() - start) / evals, (time.process_time() - cpu) / evals


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--evals", type=int, default=3000)
    ap.add_argument("--resume-evals", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dim = 2 * len(EXPERTS)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"bare pycma ask+tell": [], "evomerge, in-memory journal": [], "evomerge, SQLite journal file": []}
        for r in range(args.repeats):
            rows["bare pycma ask+tell"].append(bare_cma(args.evals, dim))
            rows["evomerge, in-memory journal"].append(spine(args.evals, None))
            rows["evomerge, SQLite journal file"].append(spine(args.evals, Path(tmp) / f"j{r}.sqlite"))
        base = [statistics.median(v[i] for v in rows["bare pycma ask+tell"]) for i in (0, 1)]
        print(f"dim {dim}, {args.evals} evaluations, median of {args.repeats} runs, µs per candidate (wall | CPU):")
        for name, vals in rows.items():
            wall, cpu = (statistics.median(v[i] for v in vals) for i in (0, 1))
            print(f"  {name:<32} {wall * 1e6:8.1f} | {cpu * 1e6:8.1f}   ({wall / base[0]:.1f}× | {cpu / base[1]:.1f}× bare pycma)")
        path = Path(tmp) / "big.sqlite"
        space = build_space("evo_joint", list(EXPERTS))
        evomerge.search(noop, space, budget=args.resume_evals, seed=1, journal=path, top_k=1)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            evomerge.search(noop, space, budget=args.resume_evals, seed=1, journal=path, top_k=1, resume=True)
            times.append(time.perf_counter() - start)
        print(f"resume of a finished {args.resume_evals}-evaluation journal: median {statistics.median(times):.2f} s")


if __name__ == "__main__":
    main()
