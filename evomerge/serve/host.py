"""The `ModelHost` seam: what the provider needs from a model, apart from HTTP.

A host applies merged weights (`merge` computes a state, `activate` patches it in) and runs
teacher-forced scoring and generation on whatever is active. The server serialises every call
through one worker thread, so a host need not be thread-safe. `TransformersRunner` holds the
scoring and generation shared by every host built on a `transformers` causal LM. ``special``
False tokenizes text without adding special tokens: chat-templated text carries its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from evomerge._imports import require
from evomerge.recipe import MergeRecipe


@dataclass(frozen=True)
class Scored:
    """Teacher-forced log-probabilities of one text, in OpenAI's completions-logprobs shape."""

    tokens: list[str]
    token_logprobs: list[float | None]
    text_offset: list[int]
    top_logprobs: list[dict[str, float] | None] | None = None


@dataclass(frozen=True)
class Generated:
    """A continuation and the number of tokens generated (what usage reports)."""

    text: str
    tokens: int


class ModelHost(Protocol):
    """What `evomerge serve` drives. `merge` is the expensive step the server caches and counts.
    A host may also be a `PopulationHost` (`EngineHost` is): score requests of distinct recipes
    then share one forward, with no merge."""

    base_name: str
    experts: tuple[str, ...]
    tokenizer: Any  # the chat route applies its chat template (`evomerge.serve.protocol.chat_prompt`)
    context_length: int | None  # positions the model was trained on: the default prompt limit

    def check(self, recipe: MergeRecipe) -> None:
        """Raise `RecipeError` (naming the field) when this host cannot apply `recipe`."""

    def merge(self, recipe: MergeRecipe) -> Any:
        """Compute the merged state of `recipe` (an opaque value the server caches)."""

    def activate(self, state: Any | None) -> None:
        """Make `state` (a `merge` result, or None for the base) the weights that answer."""

    def score(self, texts: Sequence[str], top: int = 0, special: bool = True) -> list[Scored]:
        """Log-probabilities of every token of each text under the active weights."""

    def generate(self, prompts: Sequence[str], max_tokens: int, temperature: float, seed: int | None,
                 special: bool = True, max_time: float | None = None) -> list[Generated]:
        """A continuation of each prompt, at most `max_tokens` tokens and `max_time` seconds (the
        request's deadline), under the active weights (one batched pass: a request's prompts share
        its merge)."""

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` costs (what usage reports)."""


@runtime_checkable
class PopulationHost(Protocol):
    """A host's optional path for score requests of several recipes in one forward over the base."""

    def low_rank(self, recipe: MergeRecipe) -> bool:
        """Whether `recipe` can share a forward with other recipes (no merge)."""

    def score_many(self, recipes: Sequence[MergeRecipe], texts: Sequence[Sequence[str]], top: int = 0,
                   special: bool = True) -> list[list[Scored]]:
        """`ModelHost.score` of each recipe's texts, all in one forward; leaves the base active."""


class TransformersRunner:
    """Scoring and generation over a `transformers` causal LM and its fast tokenizer."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.torch = require("torch", "evomerge serve")
        self.model = model
        self.tokenizer = tokenizer
        tokenizer.padding_side = "right"  # offsets and positions of `score` assume right padding
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score(self, texts: Sequence[str], top: int = 0, special: bool = True) -> list[Scored]:
        torch = self.torch
        enc = self.tokenizer(list(texts), return_offsets_mapping=True, return_special_tokens_mask=True,
                             padding=True, return_tensors="pt", add_special_tokens=special)
        device = self.model.device
        with torch.inference_mode():
            logits = self.model(input_ids=enc["input_ids"].to(device),
                                attention_mask=enc["attention_mask"].to(device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        ids = enc["input_ids"]
        # logprob of token t given tokens < t: position t-1's distribution at ids[t]
        picked = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).tolist()
        tops = logp[:, :-1].topk(top, dim=-1) if top > 0 else None
        top_values, top_ids = (tops.values.tolist(), tops.indices.tolist()) if tops is not None else ([], [])
        keep = (enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()).tolist()
        offsets = enc["offset_mapping"].tolist()
        out = []
        for row, text in enumerate(texts):  # plain lists here: indexing tensors per token cost ~50 ms a batch
            tokens, lps, offs, alts = [], [], [], []
            for t, kept in enumerate(keep[row]):
                if not kept:
                    continue
                start, end = offsets[row][t]
                tokens.append(text[start:end])
                offs.append(start)
                lps.append(picked[row][t - 1] if t > 0 else None)
                if tops is not None:
                    alts.append(None if t == 0 else self._alternatives(top_values[row][t - 1], top_ids[row][t - 1]))
            out.append(Scored(tokens, lps, offs, alts if tops is not None else None))
        return out

    def _alternatives(self, values: list[float], ids: list[int]) -> dict[str, float]:
        """The most likely tokens, best first, by text; tokens that decode alike (byte pieces of a
        character all read as U+FFFD) keep the best value, so there may be fewer than asked."""
        out: dict[str, float] = {}
        for v, i in zip(values, ids, strict=True):
            out.setdefault(self.tokenizer.decode([i]), v)
        return out

    def generate(self, prompts: Sequence[str], max_tokens: int, temperature: float, seed: int | None,
                 special: bool = True, max_time: float | None = None) -> list[Generated]:
        torch = self.torch
        if max_tokens <= 0:
            return [Generated("", 0) for _ in prompts]
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"  # continuations line up
        try:
            enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True,
                                 add_special_tokens=special).to(self.model.device)
        finally:
            self.tokenizer.padding_side = side
        sample = temperature > 0
        if sample and seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=sample,
                                      temperature=temperature if sample else None, top_p=None, top_k=None,
                                      pad_token_id=self.tokenizer.pad_token_id, max_time=max_time)
        done = []
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            stop = next((i + 1 for i, t in enumerate(row) if t == self.tokenizer.eos_token_id), len(row))
            done.append(Generated(self.tokenizer.decode(row[:stop], skip_special_tokens=True), stop))
        return done
