"""Which layer inputs RegMean's factors are fit on: RegMean alone (the aligned copies at β = 1, no
search) on a zoo's in-domain setting, with the same splits as `benchmarks.quality --quick`.

    python -m benchmarks.regmean_inputs --repository ZOO [--setting indomain] [--dtype bfloat16]

Variants, each fit with `regmean.aligned_factors` from the same serving map:
- base: the base model's inputs (one fit; `align: auto` before 2026-12-07);
- own: each task's inputs under its own expert alone (RegMean as published: each model's own);
- shrink 0.5: base inputs with the off-diagonals halved instead of × 0.9;
- refit: base, then fit again on the inputs of base's merge (what `align_repository` does now);
- refit twice: once more, on the inputs of refit's merge.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.quality import QUICK
from benchmarks.quality_setup import Scorer, load_setting
from evomerge.merging import regmean
from evomerge.merging.engine import MergeEngine
from evomerge.recipe import MergeRecipe
from evomerge.repository import Repository


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--setting", default="indomain", choices=("indomain", "indomain_distractors"))
    ap.add_argument("--test-per-task", type=int, default=24)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    setting = load_setting(args.repository, args.setting, QUICK["search_per_task"][1], args.test_per_task, 0.33)
    repo, experts, fit = Repository.open(args.repository), setting.experts, setting.splits.fit
    engine = MergeEngine(repo, dtype=args.dtype)
    serves = regmean.serving(engine, experts, fit)
    merge = regmean.regmean_recipe([regmean.aligned_name(e) for e in experts])  # RegMean: the copies at β = 1
    out = Path(tempfile.mkdtemp(prefix="regmean-inputs-"))
    print(f"{args.repository} {args.setting}: serves {serves}")

    def report(name: str, factors: regmean.AlignedA, started: float, shrink: float = regmean.SHRINK) -> None:
        root = regmean.write_aligned(repo, experts, factors, serves, out / name, shrink)
        scorer = Scorer(str(root), setting, args.dtype)
        m = {split: scorer(merge, split) for split in ("fit", "validation", "test")}
        print(f"| {name} | {m['test'].mean_em:.3f} | {m['fit'].mean_em:.3f} / {m['validation'].mean_em:.3f} | "
              f"{m['test'].mean_ce:.3f} | " + ", ".join(f"{t} {v:.2f}" for t, v in m["test"].em.items()) +
              f" | {time.perf_counter() - started:.1f} |", flush=True)

    print("| inputs | test EM | fit / val EM | test CE | per task | s |\n|---|---|---|---|---|---|")
    own = {t: MergeRecipe("task_arithmetic", (e,), (1.0,)) for t, e in serves.items()}
    started = time.perf_counter()
    previous = regmean.aligned_factors(engine, experts, fit, serves)
    report("base", previous, started)
    for name, source, shrink in (("own", own, regmean.SHRINK), ("shrink 0.5", None, 0.5)):
        started = time.perf_counter()
        report(name, regmean.aligned_factors(engine, experts, fit, serves, shrink=shrink, source=source), started,
               shrink)
    engine.close()
    for name in ("refit", "refit twice"):
        started = time.perf_counter()
        previous = regmean.refit(repo, experts, fit, serves, previous, out / f"{name} inputs", dtype=args.dtype)
        report(name, previous, started)


if __name__ == "__main__":
    main()
