"""Test exact match of a quality report's recipes with and without case, out of domain.

The library's exact match forgives case (it lowercases, SQuAD-style), but the smol zoo's ``upper_*``
out-of-domain tasks are about case: on ``upper_first`` ("the first letter, in capitals") the
``first_letter`` expert alone answers "c" for "C" and scores as if it had solved the task. This
scores every recipe of the report's ood setting (methods and references) on the same test split
both ways, so the ood comparison can be read on the metric the task means.

Usage: python -m benchmarks.em_case benchmarks/quality_smol-cpu-b30.json [--test-per-task 24]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from evomerge import scoring
from evomerge.recipe import MergeRecipe

from benchmarks.quality_report import by_method
from benchmarks.quality_setup import load_setting, shared_backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--test-per-task", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = json.loads(args.report.read_text())
    (ood,) = [r for r in run["settings"] if r["setting"] == "ood"]
    setting = load_setting(Path(run["repository"]), "ood", 2, args.test_per_task, 0.33, ood["tasks"][0])
    backend = shared_backend(run["repository"], None)
    examples = setting.splits.test
    rows: dict[str, list[tuple[float, float]]] = {}
    for row in ood["rows"] + ood["references"]:
        with backend.engine.merged(MergeRecipe.from_dict(row["recipe"])) as model:
            answers = scoring.generate_answers(model, backend.engine.tokenizer, examples, backend.max_new_tokens)
        cased = np.mean([a.strip() == e.answer.strip() for a, e in zip(answers, examples)])
        forgiving = np.mean([scoring.exact_match(a, e.answer) for a, e in zip(answers, examples)])
        rows.setdefault(row["method"], []).append((float(forgiving), float(cased)))
    print(f"{ood['tasks'][0]}, {len(examples)} test examples; mean ± sd over seeds\n")
    print("| method | exact match, case forgiven | exact match, cased |\n|---|---|---|")
    order = [*by_method(ood["rows"]), *(m for m in rows if m not in by_method(ood["rows"]))]
    for name in order:
        values = np.array(rows[name])
        if name.startswith("expert:") and values[:, 0].max() == 0:
            continue
        cells = [f"{values[:, i].mean():.3f}" + (f" ± {values[:, i].std(ddof=1):.3f}" if len(values) > 1 else "")
                 for i in (0, 1)]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
