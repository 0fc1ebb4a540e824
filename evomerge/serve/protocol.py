"""The wire contract shared by `evomerge serve` and the api backend, light enough for either side.

Both sides compute a per-example loss the same way: the mean negative log-probability of the
answer tokens of ``prompt + answer`` (teacher forcing). The client does it from echoed logprobs
(labels stay on the client), the provider does it in a merge session (labels go to the provider,
as in the paper); sharing this function makes the two modes agree to float precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

MERGE_FIELD = "merge"
"""The request-body field that carries a `MergeRecipe` dict (openai: ``extra_body={"merge": ...}``)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the provider; beyond these it answers 413 or 422."""

    max_body_bytes: int = 1_000_000
    max_batch: int = 64
    max_tokens: int = 256
    max_abs_weight: float = 1.5
    max_abs_scale: float = 4.0
    max_session_examples: int = 2_000
    max_sessions: int = 64


def answer_token_mask(tokens: Sequence[str], text_offset: Sequence[int], prompt_chars: int) -> list[bool]:
    """Which echoed tokens belong to the answer: those that end after the prompt does.

    A token straddling the boundary (``"=4"`` for prompt ``"2+2="`` and answer ``"4"``) counts as
    answer, so a non-empty answer always has at least one token to score.
    """
    return [off + len(tok) > prompt_chars for tok, off in zip(tokens, text_offset)]


def answer_greedy(tokens: Sequence[str], token_logprobs: Sequence[float | None],
                  top_logprobs: Sequence[dict[str, float] | None] | None, text_offset: Sequence[int],
                  prompt_chars: int) -> float:
    """1.0 when every answer token is its position's most likely one (its logprob is the best of
    ``top_logprobs``), 0.0 when one is not, NaN when the provider sent no alternatives."""
    if not top_logprobs:
        return math.nan
    mask = answer_token_mask(tokens, text_offset, prompt_chars)
    hits = [lp >= max(top.values()) - 1e-6 for lp, top, m in zip(token_logprobs, top_logprobs, mask)
            if m and lp is not None and top]
    if not hits or len(hits) < sum(m and lp is not None for lp, m in zip(token_logprobs, mask)):
        return math.nan
    return float(all(hits))


def answer_nll(tokens: Sequence[str], token_logprobs: Sequence[float | None], text_offset: Sequence[int],
               prompt_chars: int) -> float:
    """Mean negative log-probability of the answer tokens (NaN when the answer has no token)."""
    mask = answer_token_mask(tokens, text_offset, prompt_chars)
    picked = [lp for lp, m in zip(token_logprobs, mask) if m and lp is not None]
    if not picked:
        return math.nan
    return -sum(picked) / len(picked)
