"""Search quality against the merges people use today, on one repository, budget and example set.

    python -m benchmarks.quality [--repository DIR] [--quick] [--seeds 0 1 2] [--budget 500]
                                 [--settings ood indomain indomain_distractors] [--methods ...]

For each setting (see `benchmarks.quality_setup`) every method merges the same experts and sees the
same fit / validation examples; searching methods get the same budget of fit evaluations. Reported:
the test-split exact match (mean of per-task means) of the recipe each returns, mean ± sd over
seeds, beside fit and validation, the evaluations and examples scored (queries) it used; a
best-so-far test curve against evaluations (PNG); with the racing mode, the queries needed to reach
the full-evaluation run's best fit loss. Writes quality_<tag>.{md,json} and PNGs to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evomerge.baselines import single
from evomerge.recipe import MergeRecipe

from benchmarks.quality_methods import (DEFAULT, FIXED, SEARCHES, Outcome, base_recipe, candidates, run_fixed,
                                        run_search)
from benchmarks.quality_report import curve_png, markdown, race_png
from benchmarks.quality_setup import SETTINGS, Scorer, Scorers, Setting, load_setting, report_setting

QUICK = {"budget": 60, "search_per_task": (24, 6), "test_per_task": (24, 8), "references": 3}
FULL = {"budget": 500, "search_per_task": (48, 12), "test_per_task": (100, 40), "references": None}
"""Examples per task as (one target task, several tasks): a multi-task merge scores every task on
each evaluation, so it takes fewer per task to keep an evaluation's cost near the single-task one."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", help="zoo directory (default: the tiny zoo, built on first use)")
    ap.add_argument("--quick", action="store_true", help="small budget and example counts: minutes, not hours")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="optimizer seeds (default 0 1 2; quick: 0)")
    ap.add_argument("--budget", type=int, default=None, help="fit evaluations per search (default 500; quick 60)")
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    ap.add_argument("--methods", nargs="+", default=None, help=f"subset of {', '.join([*SEARCHES, *FIXED])}")
    ap.add_argument("--search-per-task", type=int, default=None, help="search examples per task (fit + validation)")
    ap.add_argument("--test-per-task", type=int, default=None)
    ap.add_argument("--ood-task", default=None, help="out-of-domain target (default: the zoo's first ood task)")
    ap.add_argument("--validation", type=float, default=0.33, help="fraction of the search examples held out")
    ap.add_argument("--top-k", type=int, default=5, help="candidates re-scored on validation before choosing")
    ap.add_argument("--dtype", default=None, help="merge/eval dtype (e.g. bfloat16); default the model's")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared CPU more threads spin-wait and run slower)")
    ap.add_argument("--race", action="store_true", help="also run the default search in racing mode (query efficiency)")
    ap.add_argument("--race-factor", type=float, default=2.0,
                    help="the raced run's budget of candidates, as a multiple of --budget (stopped ones are cheap)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for quality_<tag>.md/.json and the PNGs")
    ap.add_argument("--tag", default=None, help="name of the outputs (default: zoo preset, + -quick)")
    ap.add_argument("--combine", nargs="+", type=Path, default=None, metavar="PART.json",
                    help="merge the JSON of runs of parts of the suite (say one process per setting and seed "
                         "sharing a GPU) into one report named --tag, and run nothing")
    ap.add_argument("--rescore", type=Path, default=None, metavar="RUN.json",
                    help="score the recipes a run returned again on the first --test-per-task test examples per "
                         "task (more than the run's own tightens its test estimates; the search and the choice are "
                         "untouched), and run nothing else")
    args = ap.parse_args(argv)
    if args.combine:
        return args
    if args.rescore and not args.test_per_task:
        ap.error("--rescore needs --test-per-task (the test examples per task to score on)")
    preset = QUICK if args.quick else FULL
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.budget = args.budget or preset["budget"]
    args.search_per_task = (args.search_per_task,) * 2 if args.search_per_task else preset["search_per_task"]
    args.test_per_task = (args.test_per_task,) * 2 if args.test_per_task else preset["test_per_task"]
    args.references = preset["references"]
    args.methods = args.methods or [*SEARCHES, *FIXED]
    unknown = [m for m in args.methods if m not in SEARCHES and m not in FIXED]
    if unknown:
        ap.error(f"unknown method(s) {unknown}")
    return args


def _row(scorer: Scorer, out: Outcome, seed: int | None, seconds: float) -> dict[str, Any]:
    fit, val, test = (scorer(out.recipe, s) for s in ("fit", "validation", "test"))
    return {"method": out.method, "seed": seed, "fit_em": fit.mean_em, "val_em": val.mean_em, "test_em": test.mean_em,
            "test_ce": test.mean_ce, "test_em_tasks": test.em, "fit_evals": out.fit_evals, "val_evals": out.val_evals,
            "queries": out.queries, "seconds": round(seconds, 1), "recipe": out.recipe.to_dict(),
            **({"repository": out.repository} if out.repository else {}), **out.extra}


def _curve(scorer: Scorer, out: Outcome, budget: int) -> list[tuple[int, float]]:
    """Test exact match of the best-by-fit recipe after c evaluations, at ~8 checkpoints."""
    points = sorted({int(c) for c in np.round(np.geomspace(1, max(budget, 1), 8))} | {budget})
    curve = []
    for c in points:
        incumbent = [r for n, r in out.trace if n <= c]
        if incumbent:
            curve.append((c, scorer(incumbent[-1], "test").mean_em))
    return curve


def _race_efficiency(full: Outcome, raced: Outcome, n_fit: int) -> dict[str, Any]:
    """Evaluations-worth of queries each run needed to first reach the full run's best fit loss."""
    target = min((loss for _, loss in full.extra["fit_curve"]), default=math.inf)

    def reach(out: Outcome) -> float | None:
        hit = next((q for q, loss in out.extra["fit_curve"] if loss <= target + 1e-12), None)
        return None if hit is None else hit / n_fit

    return {"target_fit_loss": target, "full_evals_worth": reach(full), "race_evals_worth": reach(raced),
            "race_total_evals_worth": raced.queries / n_fit}


def _race_budget(args: argparse.Namespace) -> int:
    return max(1, round(args.race_factor * args.budget))


def run_setting(setting: Setting, args: argparse.Namespace, tick: Callable[[int], None],
                save: Callable[[dict[str, Any]], None] = lambda partial: None) -> dict[str, Any]:
    """Every method of `args` on `setting`, in the order given (searches over all seeds), then the
    references; `save` gets the result so far after each method, so a run cut short keeps what
    it finished."""
    repo = str(args.repository)
    scorers = Scorers(setting, args.dtype)
    scorer = scorers(repo)

    def scored(out: Outcome) -> Scorer:  # the scorer of the repository holding the recipe's experts
        return scorers(out.repository or repo)
    result: dict[str, Any] = {"setting": setting.name, **setting.describe(), "rows": [], "references": [],
                              "curves": {}, "race": [], "experts_on_own_tasks": {}, "best_single_ranking": [],
                              "complete": False}
    rows, curves, races = result["rows"], result["curves"], result["race"]
    for name in args.methods:
        if name in FIXED:
            start = time.perf_counter()
            out = run_fixed(name, setting, repo, args.dtype, args.quick, tick)
            result["best_single_ranking"] = out.extra.pop("ranking", result["best_single_ranking"])
            rows.append(_row(scored(out), out, None, time.perf_counter() - start))
            save(result)
            continue
        for seed in args.seeds:
            start = time.perf_counter()
            out = run_search(name, SEARCHES[name], setting, repo, args.dtype, args.budget, seed, args.top_k, tick)
            rows.append(_row(scored(out), out, seed, time.perf_counter() - start))
            curves.setdefault(name, []).append(_curve(scored(out), out, SEARCHES[name].budget or args.budget))
            if args.race and name == DEFAULT:
                start = time.perf_counter()
                raced = run_search(name + "_race", replace(SEARCHES[name], race=True, budget=_race_budget(args)),
                                   setting, repo, args.dtype, args.budget, seed, args.top_k, tick)
                rows.append(_row(scored(raced), raced, seed, time.perf_counter() - start))
                races.append({"seed": seed, **_race_efficiency(out, raced, len(setting.splits.fit))})
            save(result)
    references = [_row(scorer, Outcome("base", base_recipe(setting.experts)), None, 0.0)]
    chosen = [e for e, _ in result["best_single_ranking"]][: args.references]
    for e in dict.fromkeys([*(setting.own[t] for t in setting.tasks if t in setting.own), *chosen]):
        references.append(_row(scorer, Outcome(f"expert:{e}", single(e)), None, 0.0))
    result["references"] = references
    result["experts_on_own_tasks"] = _own_tasks(scorer, setting)
    result["complete"] = True
    return result


def _own_tasks(scorer: Scorer, setting: Setting) -> dict[str, float]:
    """Each task expert's test EM on its own task (the in-domain target's reference)."""
    return {t: scorer(single(setting.own[t]), "test").em[t] for t in setting.tasks if t in setting.own}


def _total_ticks(args: argparse.Namespace, settings: list[Setting]) -> int:
    total = 0
    for s in settings:
        for m in args.methods:
            if m in SEARCHES:
                total += len(args.seeds) * ((SEARCHES[m].budget or args.budget)
                                            + (_race_budget(args) if args.race and m == DEFAULT else 0))
            elif m != "uniform":
                total += len(candidates(m, s.experts, args.quick))
    return total


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.combine:
        return write(combine([json.loads(p.read_text()) for p in args.combine]), Path(args.out), args.tag or "combined")
    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    if args.rescore:
        run = json.loads(args.rescore.read_text())
        tag = args.tag or f"{args.rescore.stem.removeprefix('quality_')}-test{args.test_per_task[1]}"
        command = "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:])
        return write(rescore(run, args, command, tqdm), Path(args.out), tag)

    if args.repository is None:
        from evomerge.zoo import ensure_tiny

        args.repository = ensure_tiny()
    args.repository = Path(args.repository).resolve()
    preset = json.loads((args.repository / "zoo.json").read_text()).get("preset", args.repository.name)
    tag = args.tag or f"{preset}{'-quick' if args.quick else ''}"
    settings = [load_setting(args.repository, s, args.search_per_task[s != "ood"], args.test_per_task[s != "ood"],
                             args.validation, args.ood_task) for s in args.settings]
    started = time.perf_counter()
    bar = tqdm(total=_total_ticks(args, settings), desc="quality", unit="eval", dynamic_ncols=True)
    results: list[dict[str, Any]] = []
    run = {"command": "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": "", "machine": _machine(), "repository": str(args.repository), "preset": preset,
           "seeds": args.seeds, "budget": args.budget, "default": DEFAULT, "wall_seconds": 0, "settings": results}

    def save(settings_so_far: list[dict[str, Any]]) -> None:
        """The JSON of the run so far (the report files come at the end)."""
        run.update(settings=settings_so_far, date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   wall_seconds=round(time.perf_counter() - started))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"quality_{tag}.json").write_text(json.dumps(run, indent=1, default=str) + "\n")

    for setting in settings:
        bar.set_postfix(setting=setting.name)
        results.append(run_setting(setting, args, bar.update, lambda partial: save([*results, partial])))
    bar.close()
    save(results)
    return write(run, Path(args.out), tag)


def rescore(run: dict[str, Any], args: argparse.Namespace, command: str, progress: Callable[..., Any]) -> dict[str, Any]:
    """`run` with its test metrics scored again on the first `args.test_per_task` test examples per
    task, for tighter test estimates than a cheap run's handful. Each row's recipe, fit and
    validation metrics stay the run's; the test curves, scored on the old split, are dropped."""
    started = time.perf_counter()
    run = json.loads(json.dumps(run))
    settings = [r for r in run["settings"] if r["setting"] in args.settings]
    bar = progress(total=sum(len(r["rows"]) + len(r["references"]) for r in settings), desc="rescore", unit="recipe")
    for r in settings:
        per_task = args.test_per_task[r["setting"] != "ood"]
        setting = report_setting(run, r, per_task)
        scorers = Scorers(setting, args.dtype)
        for row in r["rows"] + r["references"]:
            test = scorers(row.get("repository", run["repository"]))(MergeRecipe.from_dict(row["recipe"]), "test")
            row.update(test_em=test.mean_em, test_ce=test.mean_ce, test_em_tasks=test.em)
            bar.update(1)
        r["experts_on_own_tasks"] = _own_tasks(scorers(run["repository"]), setting)
        r.update(test=len(setting.splits.test), curves={})
    bar.close()
    run.update(settings=settings, rescored=f"test metrics re-scored on the first {args.test_per_task[1]} test examples "
               f"per task ({args.test_per_task[0]} out of domain) in {time.perf_counter() - started:.0f} s, "
               f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}: `{command}`")
    return run


def write(run: dict[str, Any], out: Path, tag: str) -> dict[str, Any]:
    """quality_<tag>.json, .md and one PNG per setting under `out` (two where it raced)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_{tag}.json").write_text(json.dumps(run, indent=1, default=str) + "\n")
    for r in run["settings"]:
        if r["curves"]:
            curve_png(r, out / f"quality_{tag}_{r['setting']}.png", run["budget"])
        if r["race"]:
            race_png(r, out / f"quality_{tag}_{r['setting']}_race.png")
    (out / f"quality_{tag}.md").write_text(markdown(run, tag))
    print(f"wrote {out / f'quality_{tag}.md'} ({run['wall_seconds']} s)")
    return run


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One run from runs of parts of the suite on one repository and budget: rows, curves and
    racing records are pooled per setting; references are taken once each; a part cut short
    (``complete`` false) adds the methods it finished."""
    if len({(p["repository"], p["budget"]) for p in parts}) > 1:
        raise SystemExit("--combine needs parts run on one repository with one budget")
    settings: dict[str, dict[str, Any]] = {}
    for part in parts:
        for r in part["settings"]:
            into = settings.setdefault(r["setting"], {**r, "rows": [], "references": [], "curves": {}, "race": []})
            into["rows"] += r["rows"]
            into["race"] += r["race"]
            for method, curves in r["curves"].items():
                into["curves"].setdefault(method, []).extend(curves)
            known = {ref["method"] for ref in into["references"]}
            into["references"] += [ref for ref in r["references"] if ref["method"] not in known]
            into["best_single_ranking"] = into["best_single_ranking"] or r["best_single_ranking"]
            into["experts_on_own_tasks"] = into["experts_on_own_tasks"] or r["experts_on_own_tasks"]
            into["complete"] = into.get("complete", True) and r.get("complete", True)
    return {**parts[0], "command": " ; ".join(p["command"] for p in parts),
            "date": max(p["date"] for p in parts), "seeds": sorted({s for p in parts for s in p["seeds"]}),
            "wall_seconds": max(p["wall_seconds"] for p in parts), "settings": list(settings.values())}


def _machine() -> str:
    import os

    import torch

    return f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}"


if __name__ == "__main__":
    main()
