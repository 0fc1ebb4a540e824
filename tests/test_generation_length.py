"""Task helpers that need no model: the generation length both backends derive alike."""

from __future__ import annotations

from evomerge.tasks import GENERATION_MARGIN, Example, generation_length


def test_generation_length_is_the_longest_answer_in_bytes_plus_a_margin() -> None:
    examples = [Example("q = ", "abc"), Example("q =", "café"), Example("q  ", "xy")]
    # "café" is 5 UTF-8 bytes; "q  " hands its two trailing spaces to the answer: 2 + 2 = 4
    assert generation_length(examples) == 5 + GENERATION_MARGIN
    assert generation_length([Example("q:   ", "a" * 20)]) == 23 + GENERATION_MARGIN
    assert generation_length([]) == GENERATION_MARGIN
