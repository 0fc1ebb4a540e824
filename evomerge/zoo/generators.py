"""Synthetic tasks for the zoo: deterministic generators, so a seed fixes every split.

String tasks draw invented words (syllable strings), so train, search and test never share an
input and an expert must learn the rule, not a list. Two memorised tasks (antonyms, word
sentiment) use fixed lists. The out-of-domain tasks have no expert of their own: two compose two
expert skills (reverse then uppercase, first letter then uppercase), so a merge of two experts
carries them; one asks an expert's question in other words (the final letter), so one expert
carries it and the rest of the repository, its shuffled-label twin included, only gets in the way.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from evomerge.errors import ConfigError
from evomerge.tasks import Example

ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("old", "new"), ("rich", "poor"), ("hard", "soft"), ("wet", "dry"), ("early", "late"),
    ("full", "empty"), ("high", "low"), ("loud", "quiet"), ("strong", "weak"), ("thick", "thin"), ("clean", "dirty"),
    ("long", "short"), ("near", "far"), ("good", "bad"), ("true", "false"), ("cheap", "expensive"), ("wide", "narrow"),
    ("first", "last"), ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("give", "take"), ("inside", "outside"),
    ("day", "night"), ("black", "white"), ("begin", "end"), ("left", "right"), ("sweet", "sour"), ("brave", "afraid"),
)
POSITIVE = ("joy", "love", "great", "happy", "wonderful", "kind", "bright", "excellent", "friendly", "gift",
            "smile", "peace", "delight", "brilliant", "pleasant", "hope", "success", "beautiful", "calm", "fun")
NEGATIVE = ("pain", "hate", "awful", "sad", "terrible", "cruel", "gloomy", "horrible", "hostile", "loss",
            "frown", "war", "misery", "dreadful", "nasty", "fear", "failure", "ugly", "angry", "boring")

_ONSETS = "b c d f g h k l m n p r s t v z br ch cl dr fl gr pl sh st tr".split()
_VOWELS = "a e i o u a e o".split()
_CODAS = ["", "", "", "n", "r", "s", "x", "l", "t", "sh", "ch", "y"]


def invented_word(rng: random.Random) -> str:
    """A pronounceable lowercase non-word of 2 or 3 syllables, ending in a varied coda."""
    syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 2, 3)))]
    return "".join(syllables) + rng.choice(_CODAS)


def plural(word: str) -> str:
    """English regular plural: -es after s/x/ch/sh, -ies after consonant+y, else -s."""
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


X = TypeVar("X")
"""A task's input: a word, a number, a pair."""


@dataclass(frozen=True)
class TaskSpec(Generic[X]):
    """A task: how to draw one input, and its prompt, answer and optional choices."""

    name: str
    draw: Callable[[random.Random], X]
    prompt: Callable[[X], str]
    answer: Callable[[X], str]
    choices: tuple[str, ...] | None = None


def _word(rng: random.Random) -> str:
    return invented_word(rng)


def _ask(question: str) -> Callable[[object], str]:
    return lambda x: question.format(x=x) + "\nAnswer: "


TASKS: dict[str, TaskSpec[Any]] = {t.name: t for t in (
    TaskSpec("upper", _word, _ask("Write the word in capital letters: {x}"), lambda w: w.upper()),
    TaskSpec("first_letter", _word, _ask("What is the first letter of the word: {x}"), lambda w: w[0]),
    TaskSpec("last_letter", _word, _ask("What is the last letter of the word: {x}"), lambda w: w[-1]),
    TaskSpec("reverse", _word, _ask("Spell the word backwards: {x}"), lambda w: w[::-1]),
    TaskSpec("copy", _word, _ask("Repeat the word: {x}"), lambda w: w),
    TaskSpec("double", _word, _ask("Write the word twice: {x}"), lambda w: f"{w} {w}"),
    TaskSpec("plural", _word, _ask("What is the plural of the word: {x}"), plural),
    TaskSpec("length", _word, _ask("How many letters are in the word: {x}"), lambda w: str(len(w))),
    TaskSpec("add", lambda r: (r.randrange(50), r.randrange(50)), lambda ab: f"What is {ab[0]} plus {ab[1]}?\nAnswer: ",
             lambda ab: str(ab[0] + ab[1])),
    TaskSpec("parity", lambda r: r.randrange(1000), _ask("Is the number {x} even or odd?"),
             lambda n: "odd" if n % 2 else "even", choices=("even", "odd")),
    TaskSpec("antonym", lambda r: r.choice(ANTONYMS + tuple((b, a) for a, b in ANTONYMS)),
             lambda p: f"Give the opposite of the word: {p[0]}\nAnswer: ", lambda p: p[1]),
    TaskSpec("sentiment", lambda r: r.choice(POSITIVE + NEGATIVE), _ask("Is the word '{x}' positive or negative?"),
             lambda w: "positive" if w in POSITIVE else "negative", choices=("positive", "negative")),
    # Out of domain: no expert is trained on these; two compose two expert skills, one rephrases one.
    TaskSpec("upper_reverse", _word, _ask("Spell the word backwards in capital letters: {x}"),
             lambda w: w[::-1].upper()),
    TaskSpec("upper_first", _word, _ask("What is the first letter of the word, in capitals: {x}"),
             lambda w: w[0].upper()),
    TaskSpec("final_letter", _word, _ask("What is the final letter of the word: {x}"), lambda w: w[-1]),
)}


def make_splits(task: str, sizes: tuple[int, int, int], seed: int) -> dict[str, list[Example]]:
    """Train, search and test examples of one task; inputs are distinct across splits where the task allows."""
    if task not in TASKS:
        raise ConfigError(f"unknown zoo task {task!r}; choose one of {', '.join(TASKS)}")
    spec = TASKS[task]
    rng = random.Random(f"{seed}:{task}")
    seen: set[str] = set()
    out: dict[str, list[Example]] = {}
    for split, size in zip(("train", "search", "test"), sizes, strict=True):
        rows: list[Example] = []
        tries = 0
        while len(rows) < size:
            x = spec.draw(rng)
            tries += 1
            # Small input spaces (antonyms, sentiment words) cannot stay distinct; they repeat after many tries.
            if repr(x) in seen and tries < 50 * size:
                continue
            seen.add(repr(x))
            rows.append(Example(spec.prompt(x), spec.answer(x), task, f"{task}:{split}:{len(rows)}", spec.choices))
        out[split] = rows
    return out


def shuffled_labels(examples: list[Example], seed: int) -> list[Example]:
    """The same prompts with answers permuted: training data for a distractor that learns nothing useful."""
    answers = [e.answer for e in examples]
    random.Random(seed).shuffle(answers)
    return [Example(e.prompt, a, e.task, e.id, e.choices) for e, a in zip(examples, answers, strict=True)]
