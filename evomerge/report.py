"""Reports read from a journal alone: convergence plot, best candidates, coefficients, cost.

The journal is the single record of a run, so a report can be written at any time, also of a
run still going or one that crashed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import JournalError
from evomerge.journal import Journal, Trial
from evomerge.score import Cost


@dataclass(frozen=True)
class RunView:
    """What a report shows: fit trials in ask order per stage, validation scores, the choice."""

    fit: tuple[Trial, ...]
    validation: dict[tuple[int, int], Trial]
    best: Trial
    finished: bool
    cost: Cost
    config: dict
    test: dict | None


def load_run(path: str | Path) -> RunView:
    with Journal.open(path) as journal:
        fit = tuple(sorted(journal.trials(split="fit"), key=lambda t: (t.stage, t.trial)))
        validation = {(t.stage, t.trial): t for t in journal.trials(split="validation")}
        result = journal.meta("result")
        cost, config = journal.totals(), journal.meta("config") or {}
        test = journal.meta("test_report")
    if not fit:
        raise JournalError(f"journal {path} holds no evaluations yet; nothing to report")
    chosen = None
    if result:
        pick = json.loads(result) if isinstance(result, str) else result
        chosen = next((t for t in fit if (t.stage, t.trial) == (pick["stage"], pick["trial"])), None)
    if chosen is None:
        ok = [t for t in fit if t.ok]
        chosen = min(ok, key=lambda t: t.loss) if ok else fit[0]
    return RunView(fit, validation, chosen, result is not None, cost, config,
                   json.loads(test) if isinstance(test, str) else test)


def _plot(run: RunView, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paid = [t for t in run.fit if not t.cached]
    xs_eval = list(range(1, len(paid) + 1))
    xs_query, total = [], 0
    for t in paid:
        total += t.score.cost.queries
        xs_query.append(total)
    current = [t.loss if t.ok else math.nan for t in paid]
    best, low = [], math.inf
    for v in current:
        low = min(low, v) if not math.isnan(v) else low
        best.append(low)
    axes_n = 2 if total else 1
    fig, axes = plt.subplots(1, axes_n, figsize=(6 * axes_n, 4), squeeze=False)
    for ax, xs, label in zip(axes[0], (xs_eval, xs_query), ("evaluations", "queries"), strict=False):
        ax.plot(xs, current, ".", alpha=0.4, label="candidate loss")
        ax.plot(xs, best, "-", color="C3", label="best so far")
        for i in range(1, len(paid)):
            if paid[i].stage != paid[i - 1].stage:
                ax.axvline(xs[i], color="grey", ls="--", lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel("fit loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.5g}"


def write_report(journal: str | Path, out: str | Path | None = None, top: int = 10) -> dict[str, Path]:
    """Write report.md and convergence.png into `out` (default: beside the journal)."""
    run = load_run(journal)
    out_dir = Path(out) if out is not None else Path(journal).with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = out_dir / "convergence.png"
    _plot(run, plot)
    paid = [t for t in run.fit if not t.cached]
    failed = [t for t in paid if not t.ok]
    lines = [f"# evomerge report: {Path(journal).name}", "",
             f"Status: {'finished' if run.finished else 'unfinished (resume to complete)'}. "
             f"{len(paid)} paid evaluations ({len(run.fit) - len(paid)} served from cache), {len(failed)} failed.",
             f"Cost: {run.cost.queries} queries, {run.cost.tokens} tokens, {run.cost.seconds:.1f} s of evaluation.",
             "", "![convergence](convergence.png)", "",
             "## Stages", "", "| stage | evaluations | best fit loss |", "|---|---|---|"]
    for stage in sorted({t.stage for t in run.fit}):
        ts = [t for t in paid if t.stage == stage]
        ok = [t.loss for t in ts if t.ok]
        lines.append(f"| {stage} | {len(ts)} | {_fmt(min(ok) if ok else None)} |")
    best_validation = run.validation.get((run.best.stage, run.best.trial))
    lines += ["", "## Best recipe", "", f"Chosen: stage {run.best.stage}, trial {run.best.trial}, method "
              f"`{run.best.recipe.method}`; fit loss {_fmt(run.best.loss)}, validation loss "
              f"{_fmt(best_validation.loss if best_validation else None)}.",
              "", "| expert | weight (β) | keep ratio / density (α) |", "|---|---|---|"]
    r = run.best.recipe
    for i, name in enumerate(r.experts):
        lines.append(f"| {name} | {r.weights[i]:.4f} | {_fmt(r.densities[i]) if r.densities else '—'} |")
    lines += ["", f"## Top {top} candidates by fit loss", "",
              "| stage | trial | fit loss | validation loss |", "|---|---|---|---|"]
    for t in sorted((t for t in paid if t.ok), key=lambda t: t.loss)[:top]:
        v = run.validation.get((t.stage, t.trial))
        lines.append(f"| {t.stage} | {t.trial} | {_fmt(t.loss)} | {_fmt(v.loss if v else None)} |")
    if run.test:
        rows = run.test["rows"]
        metrics = sorted({k for row in rows.values() for k in row if k not in ("status", "expert", "error")})
        lines += ["", "## Test split (never seen by the search)", "",
                  "| recipe | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for name, row in rows.items():
            label = f"best single expert ({row['expert']})" if name == "best_single" else name
            lines.append(f"| {label} | " + " | ".join(_fmt(row.get(m)) for m in metrics) + " |")
    if failed:
        lines += ["", "## Failures", "", "| stage | trial | error |", "|---|---|---|"]
        lines += [f"| {t.stage} | {t.trial} | {(t.score.error or '').replace('|', '/')[:200]} |" for t in failed[:50]]
    md = out_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return {"report": md, "plot": plot}
