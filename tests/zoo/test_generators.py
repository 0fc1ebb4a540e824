"""The zoo's synthetic tasks: rules, split hygiene and determinism (pure Python, fast)."""

from __future__ import annotations

import pytest

from evomerge.errors import ConfigError
from evomerge.zoo.generators import TASKS, make_splits, plural, shuffled_labels


@pytest.mark.parametrize("word,expected", [("fox", "foxes"), ("bush", "bushes"), ("lady", "ladies"),
                                           ("day", "days"), ("cat", "cats"), ("bus", "buses")])
def test_plural_rules(word, expected):
    assert plural(word) == expected


@pytest.mark.parametrize("task", ["upper", "reverse", "plural", "add", "upper_reverse"])
def test_splits_are_seeded_and_do_not_share_inputs(task):
    a = make_splits(task, (30, 10, 10), seed=3)
    assert a == make_splits(task, (30, 10, 10), seed=3)
    assert a != make_splits(task, (30, 10, 10), seed=4)
    assert [len(a[s]) for s in ("train", "search", "test")] == [30, 10, 10]
    prompts = [e.prompt for rows in a.values() for e in rows]
    assert len(set(prompts)) == len(prompts)


def test_answers_follow_their_rule():
    ex = make_splits("upper_reverse", (5, 0, 0), seed=0)["train"][0]
    word = ex.prompt.split(": ", 1)[1].split("\n", 1)[0]
    assert ex.answer == word[::-1].upper()
    assert all(e.answer in e.choices for e in make_splits("parity", (20, 0, 0), 0)["train"])
    assert set(TASKS) >= {"upper", "first_letter", "reverse", "add", "plural", "antonym", "sentiment", "parity"}


def test_shuffled_labels_keep_prompts_and_answers_but_mismatch_them():
    rows = make_splits("reverse", (40, 0, 0), seed=1)["train"]
    mixed = shuffled_labels(rows, seed=0)
    assert [e.prompt for e in mixed] == [e.prompt for e in rows]
    assert sorted(e.answer for e in mixed) == sorted(e.answer for e in rows)
    assert sum(a.answer != b.answer for a, b in zip(mixed, rows)) > 30


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown zoo task"):
        make_splits("nope", (1, 1, 1), 0)
