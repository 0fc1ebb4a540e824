"""The quality benchmark's outputs: a Markdown table per setting, target checks, and curve PNGs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.quality_methods import DEFAULT

BASELINES = ("paper_two_stage", "lorahub_40", "lorahub_full", "random", "uniform", "task_arithmetic_grid",
             "ties_grid", "dare_grid", "best_single")


def _stat(values: list[float]) -> tuple[float, float]:
    clean = [v for v in values if v is not None and math.isfinite(v)]
    if not clean:
        return math.nan, math.nan
    return float(np.mean(clean)), float(np.std(clean, ddof=1)) if len(clean) > 1 else 0.0


def by_method(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows grouped by method: mean and sd of each number over seeds, per-task test EM means."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == name]
        agg = {k: _stat([r[k] for r in group]) for k in ("test_em", "fit_em", "val_em", "test_ce", "fit_evals",
                                                           "val_evals", "queries", "seconds")}
        agg["seeds"] = len(group)
        agg["tasks"] = {t: float(np.mean([r["test_em_tasks"][t] for r in group])) for t in group[0]["test_em_tasks"]}
        out[name] = agg
    return out


def _fmt(stat: tuple[float, float], digits: int = 3, spread: bool = True) -> str:
    mean, sd = stat
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if spread and sd > 0 else f"{mean:.{digits}f}"


def _table(groups: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| method | test EM | fit EM | val EM | test CE | fit evals | val evals | queries | seeds | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, g in groups.items():
        label = f"**{name}** (default)" if name == DEFAULT else name
        lines.append(f"| {label} | {_fmt(g['test_em'])} | {_fmt(g['fit_em'])} | {_fmt(g['val_em'])} | "
                     f"{_fmt(g['test_ce'])} | {_fmt(g['fit_evals'], 0, False)} | {_fmt(g['val_evals'], 0, False)} | "
                     f"{_fmt(g['queries'], 0, False)} | {g['seeds']} | {_fmt(g['seconds'], 0, False)} |")
    return lines


def targets(result: dict[str, Any]) -> list[str]:
    """The issue 6 / 8 targets this setting can decide, each with its numbers and a verdict."""
    g = by_method(result["rows"])
    lines: list[str] = []
    if DEFAULT not in g:
        return lines
    mine = g[DEFAULT]["test_em"][0]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    def cmp(other: str, margin: float = 0.0) -> None:
        if other in g:
            theirs = g[other]["test_em"][0]
            lines.append(f"- {DEFAULT} {mine:.3f} ≥ {other} {theirs:.3f}" + (f" + {margin:.2f}" if margin else "")
                         + f": {verdict(mine >= theirs + margin)}")

    if result["setting"] == "ood":
        cmp("lorahub_40", 0.10)
        cmp("lorahub_full", 0.10)
        cmp("best_single", 0.10)
    cmp("best_single")
    cmp("paper_two_stage")
    if result["setting"].startswith("indomain"):
        own = result["experts_on_own_tasks"]
        share = 0.75 if result["setting"] == "indomain_distractors" else 0.8  # issue 22's targets
        if own:
            ref = float(np.mean(list(own.values())))
            lines.append(f"- {DEFAULT} {mine:.3f} ≥ {share} × experts on their own tasks ({ref:.3f} → "
                         f"{share * ref:.3f}): {verdict(mine >= share * ref)}")
        grids = [b for b in BASELINES if b.endswith("_grid") and b in g]
        if grids and result["setting"] == "indomain_distractors":
            cmp(max(grids, key=lambda b: g[b]["test_em"][0]), 0.05)
        beaten = [b for b in BASELINES if b in g and g[b]["test_em"][0] >= mine]
        lines.append(f"- beats every baseline: {verdict(not beaten)}" + (f" (not: {', '.join(beaten)})" if beaten else ""))
        if "paper_two_stage" in g:
            better = [t for t, v in g[DEFAULT]["tasks"].items() if v > g["paper_two_stage"]["tasks"][t]]
            lines.append(f"- improves on paper_two_stage on ≥ 4 tasks: {len(better)} ({', '.join(better) or 'none'}): "
                         f"{verdict(len(better) >= 4)}")
    for race in result["race"]:
        full, raced = race["full_evals_worth"], race["race_evals_worth"]
        if full and raced is not None:
            lines.append(f"- racing reaches the full run's best fit loss {race['target_fit_loss']:.4f} with "
                         f"{raced:.1f} evaluations-worth of queries vs {full:.1f} (seed {race['seed']}, "
                         f"{raced / full:.0%}): {verdict(raced <= 0.5 * full)}")
        else:
            lines.append(f"- racing (seed {race['seed']}) never reached the full run's best fit loss "
                         f"{race['target_fit_loss']:.4f} ({race['race_total_evals_worth']:.1f} evaluations-worth spent): "
                         f"**not met**")
    return lines


def markdown(run: dict[str, Any], tag: str) -> str:
    lines = [f"# Search quality: {tag}", "",
             f"- command: `{run['command']}`", f"- date: {run['date']}; machine: {run['machine']}",
             f"- repository: {run['repository']} (preset {run['preset']}); seeds {run['seeds']}; budget {run['budget']}",
             f"- wall time: {run['wall_seconds']} s", *([f"- {run['rescored']}; fit and validation as in the run, "
                                                        "test curves omitted"] if "rescored" in run else []), ""]
    for r in run["settings"]:
        groups = by_method(r["rows"])
        lines += [f"## {r['setting']}", "",
                  f"tasks {', '.join(r['tasks'])}; {r['experts']} experts; fit {r['fit']}, validation "
                  f"{r['validation']}, test {r['test']} examples. EM = mean over tasks of exact match.", ""]
        if not r.get("complete", True):
            lines += ["A run of this setting was cut short: the rows are the methods it finished.", ""]
        lines += _table(groups) + ["", "References (not methods: nothing chosen):", ""]
        lines += _table(by_method(r["references"]))
        if r["experts_on_own_tasks"]:
            own = r["experts_on_own_tasks"]
            lines += ["", f"Each task expert on its own task (test EM): "
                      + ", ".join(f"{t} {v:.3f}" for t, v in own.items()) + f"; mean {np.mean(list(own.values())):.3f}."]
        if len(r["tasks"]) > 1:
            tasks = r["tasks"]
            lines += ["", "Per-task test EM:", "", "| method | " + " | ".join(tasks) + " |",
                      "|---|" + "---|" * len(tasks)]
            for name, g in groups.items():
                lines.append(f"| {name} | " + " | ".join(f"{g['tasks'][t]:.2f}" for t in tasks) + " |")
        lines.append("")
        if r["curves"]:
            lines += [f"![best-so-far test EM](quality_{tag}_{r['setting']}.png)", ""]
        if r["race"]:
            lines += [f"![query efficiency: racing against full evaluation](quality_{tag}_{r['setting']}_race.png)", ""]
        lines += ["Targets:", ""]
        lines += targets(r) or ["- (none can be decided from the methods run)"]
        lines.append("")
    return "\n".join(lines) + "\n"


def _axes() -> tuple[Any, Any, Any]:
    """pyplot (headless) with a fresh figure and axes of the report's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(7, 4.2))


def _save(plt: Any, fig: Any, ax: Any, path: Path) -> None:
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_png(result: dict[str, Any], path: Path, budget: int) -> None:
    """Best-so-far (by fit loss) test EM against fit evaluations, mean over seeds, per search."""
    plt, fig, ax = _axes()
    for name, runs in result["curves"].items():
        steps = sorted({c for run in runs for c, _ in run})
        ys = [np.mean([next((v for c, v in reversed(run) if c <= s), np.nan) for run in runs]) for s in steps]
        ax.plot(steps, ys, marker="o", ms=3, label=name, lw=2.2 if name == DEFAULT else 1.2)
    groups = by_method(result["rows"])
    for name, style in (("uniform", ":"), ("best_single", "--")):
        if name in groups:
            ax.axhline(groups[name]["test_em"][0], ls=style, color="gray", lw=1)
            ax.annotate(name, (1, groups[name]["test_em"][0]), fontsize=7, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("fit evaluations")
    ax.set_ylabel("test exact match (best-so-far by fit loss)")
    ax.set_title(f"{result['setting']}: budget {budget}")
    _save(plt, fig, ax, path)


def race_png(result: dict[str, Any], path: Path) -> None:
    """The query-efficiency figure: best-so-far fit loss against evaluations-worth of queries
    (examples scored ÷ fit examples), the full run solid and the raced run dashed, one colour per
    seed; a dot where each raced run first reaches its full run's best, a cross where the ≤ 50 %
    target would have it."""
    plt, fig, ax = _axes()
    runs = {(row["method"], row["seed"]): row["fit_curve"] for row in result["rows"] if row.get("fit_curve")}
    for i, race in enumerate(result["race"]):
        colour = f"C{i}"
        for method, style in ((DEFAULT, "-"), (f"{DEFAULT}_race", "--")):
            curve = runs.get((method, race["seed"]))
            if not curve:
                continue
            x = [q / result["fit"] for q, _ in curve]
            ax.step(x, np.minimum.accumulate([loss for _, loss in curve]), where="post", ls=style, color=colour,
                    label=f"seed {race['seed']} {'raced' if method.endswith('_race') else 'full'}")
        if race["race_evals_worth"] is not None:
            ax.plot(race["race_evals_worth"], race["target_fit_loss"], "o", color=colour, ms=5)
        if race["full_evals_worth"]:
            ax.plot(0.5 * race["full_evals_worth"], race["target_fit_loss"], "x", color=colour, ms=7)
    ax.set_xlabel("evaluations-worth of queries (examples scored ÷ fit examples)")
    ax.set_ylabel("best fit loss so far")
    ax.set_title(f"{result['setting']}: racing against full evaluation")
    _save(plt, fig, ax, path)
