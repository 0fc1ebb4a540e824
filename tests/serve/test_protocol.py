"""The scoring rule both backends share: which tokens are the answer, what generation continues,
and the chat wrapping (`evomerge.serve.protocol`)."""

from __future__ import annotations

import math

import pytest

from evomerge.errors import TaskError
from evomerge.serve import protocol as p


def test_trailing_spaces_of_the_prompt_belong_to_the_answer() -> None:
    assert p.answer_start("Answer: ") == p.answer_start("Answer:") == 7
    assert p.answer_start("Answer:   ") == 7 and p.answer_start("   ") == 0
    assert p.answer_start("Answer:\n") == 8 and p.answer_start("Answer:\t") == 8  # only " " moves
    assert p.generation_prompt("Answer: ") == "Answer:" and p.generation_prompt("Q:\n") == "Q:\n"


def test_answer_tokens_end_after_the_boundary_and_a_straddling_one_counts() -> None:
    tokens, offsets = ["Answer", ":", " cold"], [0, 6, 7]
    assert p.answer_token_mask(tokens, offsets, "Answer: ") == [False, False, True]
    assert p.answer_token_mask(tokens, offsets, "Answer:") == [False, False, True]
    assert p.answer_token_mask(["2", "+", "2", "=4"], [0, 1, 2, 3], "2+2=") == [False, False, False, True]
    assert p.answer_token_mask(["Q", ":", "\n", "x"], [0, 1, 2, 3], "Q:\n") == [False, False, False, True]
    assert p.ends_after([0, 6, 7, 12], 7) == [False, False, False, True]  # (0, 0): a special token


def test_loss_and_greedy_read_only_the_answer_tokens() -> None:
    tokens, offsets, lps = ["Q", ":", " a", " b"], [0, 1, 2, 4], [None, -5.0, -1.0, -3.0]
    assert p.answer_nll(tokens, lps, offsets, "Q: ") == pytest.approx(2.0)
    tops = [None, {":": -5.0}, {" a": -1.0, " c": -2.0}, {" z": -0.5, " b": -3.0}]
    assert p.answer_greedy(tokens, lps, tops, offsets, "Q:") == 0.0
    assert p.answer_greedy(tokens[:3], lps[:3], tops[:3], offsets[:3], "Q:") == 1.0
    assert math.isnan(p.answer_greedy(tokens, lps, None, offsets, "Q:"))
    assert math.isnan(p.answer_nll(tokens, lps, offsets, "Q: a b"))  # no answer token
    assert math.isnan(p.all_greedy([-1.0], [[]])) and math.isnan(p.mean_nll([]))


class _Tokenizer:
    chat_template: str | None = None

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:
        turns = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return turns + ("[assistant]" if add_generation_prompt else "")


def test_chat_wraps_a_user_turn_and_refuses_a_tokenizer_without_a_template() -> None:
    tok = _Tokenizer()
    with pytest.raises(TaskError, match="task.chat") as info:
        p.chat_prompt(tok, p.chat_messages("hi"))
    assert "\n" not in str(info.value)
    tok.chat_template = "set"
    assert p.chat_prompt(tok, p.chat_messages("hi")) == "[user]hi[assistant]"
    assert p.chat_messages("hi", " yes") == [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": " yes"}]
