"""Task files: which task a file's rows belong to when they do not say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge.config import TaskConfig
from evomerge.tasks import load_jsonl, load_splits, task_name


@pytest.mark.parametrize(("path", "task"), [
    ("tasks/plural/search.jsonl", "plural"),
    ("tasks/plural/test.jsonl", "plural"),
    ("data/Upper/TRAIN.jsonl", "Upper"),
    ("plural_test.jsonl", "plural"),
    ("plural.search.jsonl", "plural"),
    ("first-letter-dev.jsonl", "first-letter"),
    ("first_letter.jsonl", "first_letter"),
    ("contest.jsonl", "contest"),        # a split word inside a name is part of it
    ("my_testing.jsonl", "my_testing"),
])
def test_a_file_names_its_task_by_stem_less_a_split_word(path: str, task: str) -> None:
    assert task_name(path) == task


def _write(path: Path, pairs: list[tuple[str, str]], task: str | None = None) -> Path:
    """JSONL rows of `pairs`, with a task field only where `task` is given (as users write them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": p, "answer": a, **({"task": task} if task else {})} for p, a in pairs]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_files_laid_out_per_task_folder_search_as_separate_tasks(tmp_path: Path) -> None:
    files, test_files = [], []
    for task in ("upper", "plural"):
        files.append(_write(tmp_path / "tasks" / task / "search.jsonl", [(f"{task} {i}:", f" {i}") for i in range(4)]))
        test_files.append(_write(tmp_path / "tasks" / task / "test.jsonl", [(f"{task} t:", " t")]))
    splits = load_splits(TaskConfig(files=files, test_files=test_files, validation=0.25), None)
    assert splits.tasks == ("plural", "upper")
    assert {e.task for e in splits.fit} == {e.task for e in splits.validation} == {"plural", "upper"}
    assert sorted(e.task for e in splits.test) == ["plural", "upper"]


def test_a_task_field_in_the_rows_wins_over_the_file_name(tmp_path: Path) -> None:
    path = _write(tmp_path / "tasks" / "mixed" / "search.jsonl", [("a", " b")], task="sky")
    assert [e.task for e in load_jsonl(path)] == ["sky"]
