"""The wire contract shared by `evomerge serve`, the api backend and the local scorers, light enough
for either side.

One rule says which tokens are scored, so local and api backends (and training) agree on every
tokenizer (lm-eval-harness's rule): the scored text is ``prompt + answer`` tokenized as one string;
trailing spaces of the prompt belong to the answer (a BPE tokenizer merges ``" cold"`` into one
token, so the boundary sits before them); the answer tokens are those that end after that
boundary, a straddling token included. Generation continues the prompt with those spaces moved
likewise. The mean negative log-probability of the answer tokens is the per-example loss: the
client computes it from echoed logprobs (labels stay on the client), the provider in a merge
session (labels go to the provider, as in the paper); sharing these functions makes every path
agree to float precision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evomerge.errors import TaskError

MERGE_FIELD = "merge"
"""The request-body field that carries a `MergeRecipe` dict (openai: ``extra_body={"merge": ...}``)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the provider; beyond these it answers 400, 413, 422 or 429, and
    a request still unanswered at its deadline gets 504 (`evomerge.serve.admission`)."""

    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int | None = None
    """Tokens of one prompt (None: the model's context length, else 4096)."""
    tokens_per_minute: int | None = None
    """Per API key, prompts and generations together (None: no limit)."""
    deadline: float = 60.0
    """Seconds a request may take, queueing included."""
    max_batch: int = 64
    max_tokens: int = 256
    max_abs_weight: float = 1.5
    max_abs_scale: float = 4.0
    max_session_examples: int = 2_000
    max_sessions: int = 64


def answer_start(prompt: str) -> int:
    """Where the answer begins in ``prompt + answer``: before the prompt's trailing spaces (" " only;
    a newline ends a prompt for good)."""
    return len(prompt.rstrip(" "))


def generation_prompt(prompt: str) -> str:
    """The text generation continues: the prompt without the trailing spaces the answer owns."""
    return prompt[: answer_start(prompt)]


def ends_after(token_ends: Sequence[int], chars: int) -> list[bool]:
    """Which tokens end after character `chars`: a token straddling it counts, so a non-empty answer
    always has a token to score. Special tokens (offsets (0, 0)) never do."""
    return [end > chars for end in token_ends]


def answer_token_mask(tokens: Sequence[str], text_offset: Sequence[int], prompt: str) -> list[bool]:
    """Which echoed tokens of ``prompt + answer`` (OpenAI's completions logprobs) are answer tokens."""
    return ends_after([off + len(tok) for tok, off in zip(tokens, text_offset, strict=False)], answer_start(prompt))


def mean_nll(logprobs: Sequence[float | None]) -> float:
    """Mean negative log-probability of answer tokens (NaN when there is none)."""
    picked = [lp for lp in logprobs if lp is not None]
    return -sum(picked) / len(picked) if picked else math.nan


def all_greedy(logprobs: Sequence[float | None], top_logprobs: Sequence[Sequence[float] | None]) -> float:
    """1.0 when every answer token is its position's most likely one (its logprob is the best of
    its alternatives), 0.0 when one is not, NaN when alternatives are missing."""
    scored = [(lp, top) for lp, top in zip(logprobs, top_logprobs, strict=False) if lp is not None]
    known = [(lp, top) for lp, top in scored if top]
    if not scored or len(top_logprobs) < len(logprobs) or len(known) < len(scored):
        return math.nan
    return float(all(lp >= max(top) - 1e-6 for lp, top in known))


def answer_nll(tokens: Sequence[str], token_logprobs: Sequence[float | None], text_offset: Sequence[int],
               prompt: str) -> float:
    """Mean negative log-probability of the answer tokens of echoed ``prompt + answer``."""
    mask = answer_token_mask(tokens, text_offset, prompt)
    return mean_nll([lp for lp, m in zip(token_logprobs, mask, strict=False) if m])


def answer_greedy(tokens: Sequence[str], token_logprobs: Sequence[float | None],
                  top_logprobs: Sequence[dict[str, float] | None] | None, text_offset: Sequence[int],
                  prompt: str) -> float:
    """`all_greedy` over the answer tokens of echoed ``prompt + answer`` (NaN without ``top_logprobs``)."""
    if not top_logprobs:
        return math.nan
    mask = answer_token_mask(tokens, text_offset, prompt)
    picked = [(lp, list(top.values()) if top else None)
              for lp, top, m in zip(token_logprobs, top_logprobs, mask, strict=False) if m]
    return all_greedy([lp for lp, _ in picked], [top for _, top in picked])


def chat_messages(prompt: str, answer: str | None = None) -> list[dict[str, str]]:
    """A task prompt as a chat: the user's turn, and the answer to score as the assistant's."""
    turns = [{"role": "user", "content": prompt}]
    return turns if answer is None else turns + [{"role": "assistant", "content": answer}]


def chat_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """`messages` in the tokenizer's chat template, as text (tokenize it without adding special
    tokens: the template carries them). Local scoring with ``task.chat`` and the provider's chat
    route both call this, so both score the same tokens; a tokenizer without a template is refused
    rather than given a made-up format neither the model nor another provider would use."""
    if not getattr(tokenizer, "chat_template", None):
        raise TaskError("the tokenizer has no chat template, which task.chat and /v1/chat/completions need; "
                        "set task.chat to false, or use a model whose tokenizer has one")
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
