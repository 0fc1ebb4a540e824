"""Tasks: labelled examples in JSONL (`{"prompt", "answer"}` per line) and their splits.

A search sees only the *fit* split; the recipe it returns is chosen on *validation*; *test* is
for reporting and never touches a search (DESIGN.md: selection on held-out examples is part of
the design, since minimising the loss on a few fit examples can halve test accuracy).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, TaskError
from evomerge.serve.protocol import answer_start

if TYPE_CHECKING:
    from evomerge.config import TaskConfig
    from evomerge.repository import Repository

SPLITS = ("fit", "validation", "test")
SPLIT_WORDS = frozenset({"search", "fit", "train", "training", "validation", "valid", "val", "dev", "test", "eval",
                         "evaluation"})
"""File-name words that name a split, not a task: ``tasks/plural/search.jsonl`` and ``plural_test.jsonl``
hold task ``plural``."""
GENERATION_MARGIN = 4
"""Tokens generated beyond the longest answer's bytes (a token that runs past its end, a stop)."""


@dataclass(frozen=True)
class Example:
    """One labelled example. ``choices`` is set for multiple-choice scoring."""

    prompt: str
    answer: str
    task: str = "default"
    id: str = ""
    choices: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "answer": self.answer, "task": self.task, "id": self.id}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


def task_name(path: str | Path) -> str:
    """The task a file's rows belong to unless they carry ``task``: its stem less a split word
    (``plural_test`` -> ``plural``), or its folder's name where the stem is only a split word, so
    ``tasks/NAME/search.jsonl`` and ``tasks/NAME/test.jsonl`` name one task, and files of several
    tasks laid out that way do not merge into one task called ``search``."""
    path = Path(path)
    stem = re.sub(r"[._-](" + "|".join(sorted(SPLIT_WORDS)) + r")$", "", path.stem, flags=re.IGNORECASE)
    if stem.lower() in SPLIT_WORDS:
        return path.resolve().parent.name or stem
    return stem


def load_jsonl(path: str | Path, task: str | None = None) -> list[Example]:
    """Read examples; a bad line is reported with its file and line number."""
    path = Path(path)
    name = task or task_name(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TaskError(f"cannot read task file {path}: {exc.strerror or exc}") from None
    out = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path}:{no}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str)):
            raise TaskError(f'{path}:{no}: each line needs string fields "prompt" and "answer"')
        choices = row.get("choices")
        if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
            raise TaskError(f'{path}:{no}: "choices" must be a list of strings')
        out.append(Example(row["prompt"], row["answer"], str(row.get("task", name)),
                           str(row.get("id", f"{name}:{no}")), None if choices is None else tuple(choices)))
    if not out:
        raise TaskError(f"{path} holds no examples; add JSONL lines with prompt and answer")
    return out


def generation_length(examples: Iterable[Example]) -> int:
    """How many new tokens generation needs so the longest answer can be produced whole: its UTF-8
    bytes (with the prompt's trailing spaces it owns) plus a margin. A token covers at least one
    byte, so the bound needs no tokenizer and the local and api backends derive the same length."""
    return max((len((e.prompt[answer_start(e.prompt):] + e.answer).encode("utf-8")) for e in examples),
               default=0) + GENERATION_MARGIN


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class Splits:
    """Fit, validation and test examples of one search."""

    fit: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]

    def __post_init__(self) -> None:
        if not self.fit:
            raise TaskError("the fit split is empty; give the search more examples or a smaller validation fraction")

    def get(self, split: str) -> tuple[Example, ...]:
        """The examples of a split; ``NAME:K`` is its first K examples (racing's minibatch)."""
        name, _, count = split.partition(":")
        if name not in SPLITS or (count and not count.isdigit()):
            raise TaskError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} (or NAME:K for the first K)")
        examples = getattr(self, name)
        return examples[: int(count)] if count else examples

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(sorted({e.task for e in self.fit + self.validation + self.test}))


def split_search(examples: Sequence[Example], validation: float,
                 seed: int = 0) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """Divide search examples into fit and validation, stratified by task and seeded; fit comes
    interleaved by task."""
    if not 0.0 <= validation < 1.0:
        raise TaskError(f"validation fraction {validation} must lie in [0, 1)")
    by_task: dict[str, list[Example]] = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
    fits: list[list[Example]] = []
    val: list[Example] = []
    rng = random.Random(seed)
    for task in sorted(by_task):
        group = list(by_task[task])
        rng.shuffle(group)
        k = int(round(len(group) * validation))
        if validation > 0 and len(group) > 1:
            k = max(1, min(k, len(group) - 1))
        val.extend(group[:k])
        fits.append(group[k:])
    # Tasks interleaved, so any prefix of fit ("fit:K", racing's minibatch) spans every task.
    fit = [ex for row in zip_longest(*fits) for ex in row if ex is not None]
    return tuple(fit), tuple(val)


def _zoo_default_tasks(root: Path) -> list[str]:
    """A zoo's out-of-domain targets: the demo's task when the config names none."""
    try:
        return list(json.loads((root / "zoo.json").read_text()).get("ood_tasks") or [])[:1]
    except (OSError, ValueError):
        return []


def load_splits(task: TaskConfig, repo: Repository | None) -> Splits:
    """Fit / validation / test examples from repository task names and/or JSONL files."""
    names = task.tasks or ([] if task.files or repo is None or repo.root is None else _zoo_default_tasks(repo.root))
    search_examples: list[Example] = []
    test: list[Example] = []
    for name in names:
        if repo is None or name not in repo.tasks:
            known = ", ".join(sorted(repo.tasks)) if repo is not None else "none (no --repository given)"
            raise ConfigError(f"task {name!r} is not in the repository; known tasks: {known or 'none'}")
        search_examples += load_jsonl(repo.tasks[name]["search"], task=name)
        test += load_jsonl(repo.tasks[name]["test"], task=name)
    for path in task.files:
        search_examples += load_jsonl(path)
    for path in task.test_files:
        test += load_jsonl(path)
    if not search_examples:
        raise ConfigError("no examples to search on: set task.tasks (repository task names) or task.files (JSONL)")
    fit, val = split_search(search_examples, task.validation, task.split_seed)
    if task.max_fit is not None:
        fit = fit[: task.max_fit]
    return Splits(fit, val, tuple(test))
