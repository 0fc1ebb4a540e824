"""How much CPU an optimizer costs per candidate, next to what an evaluation costs.

The paper's candidate takes ~0.9 s to merge and score on this class of machine; an optimizer should
stay far below that at the dimensions evomerge searches (2N for N experts, more with blocks).
Measures ask+tell per candidate on a no-op loss (constant loss plus tiny noise so rankings are
defined), after a warm-up, in microseconds: the median (a typical call) and the mean (the
amortised cost: CMA-ES does its generation's work in one call out of λ). Random search is the
baseline of the ratio.

    /work/venv/bin/python benchmarks/optimizer_overhead.py [--dims 20 200] [--evals 400]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import datetime, timezone

import numpy as np

from evomerge.optimizers import make_optimizer
from evomerge.search_spaces import EvoSpace

NAMES = ("random", "cma", "ngopt", "ng-cma", "twopointsde", "pso", "oneplusone")


def per_candidate_us(name: str, dim: int, evals: int, warmup: int) -> tuple[float, float]:
    space = EvoSpace([f"e{i}" for i in range(dim // 2)], "joint")
    options = {} if name in ("random", "cma") else {"budget": evals + warmup}
    opt = make_optimizer(name, space, seed=0, **options)
    noise = np.random.default_rng(0).normal(scale=1e-9, size=evals + warmup)
    times = []
    for i in range(evals + warmup):
        t0 = time.perf_counter()
        z = opt.ask()
        opt.tell(z, 1.0 + noise[i])
        times.append(time.perf_counter() - t0)
    kept = times[warmup:]
    return statistics.median(kept) * 1e6, statistics.fmean(kept) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--evals", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}; µs per ask+tell over {args.evals} candidates")
    print(f"{'optimizer':<12}" + "".join(f"{f'd={d} median':>14}{'mean':>10}{'mean/rnd':>10}" for d in args.dims))
    base = {d: per_candidate_us("random", d, args.evals, args.warmup) for d in args.dims}
    for name in NAMES:
        row = f"{name:<12}"
        for d in args.dims:
            median, mean = base[d] if name == "random" else per_candidate_us(name, d, args.evals, args.warmup)
            row += f"{median:>14.1f}{mean:>10.1f}{mean / base[d][1]:>10.1f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
