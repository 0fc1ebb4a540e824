"""Test exact match of a quality report's recipes with and without case.

The library's exact match forgives case (it lowercases, SQuAD-style), but the smol zoo's ``upper_*``
out-of-domain tasks are about case: on ``upper_first`` ("the first letter, in capitals") the
``first_letter`` expert alone answers "c" for "C" and scores as if it had solved the task. This
scores every recipe of one setting of a report (methods and references; default ood) on the same
test split both ways, so the comparison can be read on the metric the task means; in domain it
also scores each task expert on its own task both ways (the reference of the 0.9 × target).

Usage: python -m benchmarks.em_case benchmarks/results/quality_smol-cpu-b30.json [--setting ood] [--test-per-task N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from evomerge import inference
from evomerge.recipe import MergeRecipe
from evomerge.tasks import Example

from benchmarks.quality_report import by_method
from benchmarks.quality_setup import report_setting, shared_backend


def main(argv: list[str] | None = None) -> tuple[dict[str, list[tuple[float, float]]], dict[str, tuple[float, float]]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--setting", default="ood")
    ap.add_argument("--test-per-task", type=int, default=None, help="default: the report's own test split")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = json.loads(args.report.read_text())
    (result,) = [r for r in run["settings"] if r["setting"] == args.setting]
    per_task = args.test_per_task or result["test"] // len(result["tasks"])
    setting = report_setting(run, result, per_task)
    examples = setting.splits.test
    rows: dict[str, list[tuple[float, float]]] = {}
    own: dict[str, tuple[float, float]] = {}
    for row in result["rows"] + result["references"]:
        backend = shared_backend(row.get("repository", run["repository"]), None)  # aligned copies live apart
        with backend.engine.merged(MergeRecipe.from_dict(row["recipe"])) as model:
            answers = inference.generate_answers(model, backend.engine.tokenizer, examples, backend.max_new_tokens)
        forgiving = _by_task([inference.exact_match(a, e.answer) for a, e in zip(answers, examples)], examples)
        cased = _by_task([float(a.strip() == e.answer.strip()) for a, e in zip(answers, examples)], examples)
        rows.setdefault(row["method"], []).append((float(np.mean(list(forgiving.values()))),
                                                  float(np.mean(list(cased.values())))))
        task = row["method"].removeprefix("expert:")
        if row["method"].startswith("expert:") and task in forgiving:  # out of domain no expert has the task
            own[task] = (forgiving[task], cased[task])
    print(f"{', '.join(result['tasks'])}: {len(examples)} test examples; mean over tasks, ± sd over seeds\n")
    print("| method | exact match, case forgiven | exact match, cased |\n|---|---|---|")
    methods = list(by_method(result["rows"]))
    for name in [*methods, *(m for m in rows if m not in methods)]:
        values = np.array(rows[name])
        if name.startswith("expert:") and values[:, 0].max() == 0:
            continue
        cells = [f"{values[:, i].mean():.3f}" + (f" ± {values[:, i].std(ddof=1):.3f}" if len(values) > 1 else "")
                 for i in (0, 1)]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    if own:
        forgiving, cased = np.mean(list(own.values()), axis=0)
        print(f"\nEach task expert on its own task (the in-domain target's reference): case forgiven {forgiving:.3f}, "
              f"cased {cased:.3f} ({', '.join(f'{t} {f:.2f}/{c:.2f}' for t, (f, c) in own.items())})")
    return rows, own


def _by_task(values: list[float], examples: Sequence[Example]) -> dict[str, float]:
    """Each task's mean; their mean is the quality report's EM."""
    by_task: dict[str, list[float]] = {}
    for v, e in zip(values, examples):
        by_task.setdefault(e.task, []).append(v)
    return {task: float(np.mean(v)) for task, v in by_task.items()}


if __name__ == "__main__":
    main()
