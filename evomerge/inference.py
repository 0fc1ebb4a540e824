"""Shared scorers, so training, the local backend and the api provider judge answers the same way.

The prompt/answer format (one format for training and scoring; the rule lives in
`evomerge.serve.protocol`, which the provider and the api client use too):

* the scored text is ``prompt + answer`` tokenized as one string, with the tokenizer's special
  tokens (a BOS where it adds one; never scored), so a BPE tokenizer merges across the boundary
  exactly as it does for the provider; a task that wants a separator ends its prompt with it;
* trailing spaces of the prompt belong to the answer (``"Answer: "`` + ``"cold"`` scores the
  token ``" cold"``, as ``"Answer:"`` + ``" cold"`` does); the answer tokens are those that end
  after the prompt without them (the fast tokenizer's offsets say where), a straddling token included;
* with ``chat`` the prompt is first wrapped in the tokenizer's chat template (a user turn, the
  generation prompt added) and the text is tokenized without adding special tokens again;
* for training an EOS id follows the answer (the model learns to stop); scoring measures the
  answer tokens only, or (``ce_stop``) the answer and then its end, one token generation ends an
  answer at (`end_ids`);
* generation is greedy from the prompt without those trailing spaces and stops at EOS or at the
  first newline; the text is stripped.

Teacher-forced batches are right-padded (positions start at 0 in every row); generation batches
are left-padded so every row's next token sits in the last column.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from evomerge._imports import require
from evomerge.errors import TaskError
from evomerge.serve.protocol import answer_start, chat_messages, chat_prompt, ends_after, generation_prompt
from evomerge.tasks import Example, generation_length


def _torch():
    return require("torch", "scoring with a local model")


def model_prompt(tokenizer: Any, prompt: str, chat: bool = False) -> str:
    """The text before the answer: `prompt`, or with `chat` its chat-templated user turn."""
    return chat_prompt(tokenizer, chat_messages(prompt)) if chat else prompt


def refuse_unscorable(tokenizer: Any, chat: bool, metrics: Sequence[str]) -> None:
    """Raise one `TaskError` line where `tokenizer` cannot score as asked: `chat` with no chat
    template, ``ce_stop`` with no token to end an answer (`end_ids`)."""
    if chat:
        model_prompt(tokenizer, "", chat=True)
    if "ce_stop" in metrics:
        end_ids(tokenizer)


def encode(tokenizer: Any, pairs: Sequence[tuple[str, str]], eos: bool = False,
           chat: bool = False) -> list[tuple[list[int], int]]:
    """Per (prompt, answer): the token ids of the scored text (EOS appended when `eos`) and the
    index of its first answer token (at least 1: the first token has no context to predict it);
    the answer tokens run to the end. Special tokens a tokenizer appends after the text are
    dropped (never scored; the model is causal, so nothing before them changes)."""
    prompts = [model_prompt(tokenizer, p, chat) for p, _ in pairs]
    enc = tokenizer([p + a for p, (_, a) in zip(prompts, pairs, strict=True)], add_special_tokens=not chat,
                    return_offsets_mapping=True)
    if eos and tokenizer.eos_token_id is None:
        raise TaskError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
    out = []
    for ids, offsets, prompt, (_, answer) in zip(enc["input_ids"], enc["offset_mapping"], prompts, pairs, strict=True):
        mask = ends_after([end for _, end in offsets], answer_start(prompt))
        if not answer or True not in mask:
            raise TaskError(f"answer {answer!r} has no tokens; every example needs a non-empty answer")
        last = len(mask) - mask[::-1].index(True)
        out.append((list(ids[:last]) + ([tokenizer.eos_token_id] if eos else []), max(1, mask.index(True))))
    return out


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def _device(model: Any):
    return next(model.parameters()).device


class _evaluating:
    """Puts a model in eval mode (no dropout) for a block and restores its previous mode."""

    def __init__(self, model: Any) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def training_batch(tokenizer: Any, pairs: Sequence[tuple[str, str]], chat: bool = False) -> dict:
    """A right-padded batch with labels on the answer (and EOS) tokens only, for causal-LM training."""
    torch = _torch()
    encoded = encode(tokenizer, pairs, eos=True, chat=chat)
    width = max(len(ids) for ids, _ in encoded)
    pad = pad_id(tokenizer)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(encoded):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[row, : len(ids)] = t
        attention[row, : len(ids)] = 1
        labels[row, n_prompt : len(ids)] = t[n_prompt:]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _keeps_logits(model: Any) -> bool:
    """Whether `model.forward` takes transformers' `logits_to_keep` (positions to compute logits for);
    asked once per model class (a forward set on the instance itself is asked each time)."""
    if "forward" in getattr(model, "__dict__", {}):
        return _takes_logits_to_keep(model.forward)
    return _class_keeps_logits(type(model))  # type: ignore[arg-type]  # classes hash; mypy disagrees (python/mypy#11470)


@lru_cache(maxsize=64)
def _class_keeps_logits(cls: type[Any]) -> bool:
    return _takes_logits_to_keep(cls.forward)


def _takes_logits_to_keep(forward: Any) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(forward).parameters


class Forced(NamedTuple):
    """Per-pair scores of one teacher-forced pass."""

    ce: np.ndarray
    """mean cross-entropy of the answer tokens (nats per token)"""
    greedy_match: np.ndarray
    """1.0 where every answer token is the argmax given its prefix (lm-eval's ``is_greedy``)"""
    ce_stop: np.ndarray | None
    """the same mean with the answer's end as one more token (`end_ids`), when asked for"""


def _teacher_forced(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                    batch_size: int, chat: bool = False, stop: bool = False) -> Forced:
    """`Forced` scores of each pair from one forward pass; `ce_stop` only with `stop` (it needs the
    logits one position past the answer)."""
    torch = _torch()
    ce = np.empty(len(pairs), dtype=np.float64)
    greedy = np.empty(len(pairs), dtype=np.float64)
    ce_stop = np.empty(len(pairs), dtype=np.float64) if stop else None
    device = _device(model)
    ends = torch.tensor(end_ids(tokenizer), dtype=torch.long, device=device) if stop else None
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        encoded = encode(tokenizer, chunk, chat=chat)
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), pad_id(tokenizer), dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        # Token t is predicted by the logits at position t-1; only answer positions (and, for the
        # stop, the last one) get a softmax, and where the model allows, only the span holding them
        # gets logits at all (the output layer is a fifth of a small model's compute, and its
        # logits most of the memory).
        where = torch.zeros_like(input_ids, dtype=torch.bool)
        last = torch.zeros_like(where)
        for row, (ids, n_prompt) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[row, : len(ids)] = 1
            where[row, n_prompt - 1 : len(ids) - 1] = True
            last[row, len(ids) - 1] = True
        target = input_ids.roll(-1, dims=1)[where].to(device)
        lo, hi = min(n_prompt for _, n_prompt in encoded) - 1, width if stop else width - 1
        span = {"logits_to_keep": torch.arange(lo, hi, device=device)} if _keeps_logits(model) else {}
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), **span).logits
        window = slice(lo, hi) if span else slice(None)  # the columns of the logits kept
        picked = logits[where[:, window].to(device)].float()
        token_lp = torch.log_softmax(picked, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu().numpy()
        token_greedy = (picked.argmax(-1) == target).cpu().numpy()
        if ends is not None:
            after = torch.log_softmax(logits[last[:, window].to(device)].float(), dim=-1)
            end_lp = after[:, ends].logsumexp(-1).cpu().numpy()
        bounds = np.cumsum([len(ids) - n_prompt for ids, n_prompt in encoded])[:-1]
        for row, (lp, hit) in enumerate(zip(np.split(token_lp, bounds), np.split(token_greedy, bounds), strict=True)):
            ce[start + row] = -float(lp.mean())
            greedy[start + row] = float(hit.all())
            if ce_stop is not None:
                ce_stop[start + row] = -float((lp.sum() + end_lp[row]) / (len(lp) + 1))
    return Forced(ce, greedy, ce_stop)


def answer_cross_entropy(model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int = 64,
                         chat: bool = False) -> np.ndarray:
    """Per-example mean cross-entropy (nats per token) of the answer given the prompt."""
    return answer_scores(model, tokenizer, examples, batch_size, chat).ce


def answer_scores(model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int = 64,
                  chat: bool = False, stop: bool = False) -> Forced:
    """Per-example answer cross-entropy and greedy match (1.0 when greedy decoding would produce
    the answer's tokens), and with `stop` the cross-entropy of the answer and its end, from one
    teacher-forced pass: the match costs no generation."""
    torch = _torch()
    with torch.no_grad(), _evaluating(model):
        return _teacher_forced(model, tokenizer, [(e.prompt, e.answer) for e in examples], batch_size, chat, stop)


@lru_cache(maxsize=8)
def _token_texts(tokenizer: Any) -> tuple[str, ...]:
    return tuple(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


@lru_cache(maxsize=8)
def _stop_ids(tokenizer: Any) -> tuple[int, ...]:
    """EOS and every token whose text holds a newline: an answer ends at the first of them, so
    generation stops there instead of running to ``max_new_tokens`` on every row."""
    return tuple(_eos(tokenizer) + [i for i, text in enumerate(_token_texts(tokenizer)) if "\n" in text])


@lru_cache(maxsize=8)
def end_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokens that end an answer as generated: EOS, and the newline tokens with nothing but
    whitespace before their newline (``"x\n"`` would append an x to the stripped answer)."""
    ends = tuple(_eos(tokenizer) + [i for i, text in enumerate(_token_texts(tokenizer))
                                    if "\n" in text and not text.split("\n", 1)[0].strip()])
    if not ends:
        raise TaskError("the tokenizer has no EOS or newline token, so an answer's end cannot be scored; "
                        "use objective metric 'ce' instead of 'ce_stop'")
    return ends


def generate_answers(model: Any, tokenizer: Any, examples: Sequence[Example], max_new_tokens: int | None = None,
                     batch_size: int = 64, chat: bool = False) -> list[str]:
    """Greedy answers to each prompt, cut at EOS or the first newline and stripped; at most
    `max_new_tokens` tokens (default: `generation_length` of `examples`, so the longest answer fits)."""
    torch = _torch()
    max_new_tokens = max_new_tokens or generation_length(examples)
    device = _device(model)
    stops = _stop_ids(tokenizer)
    stop_set = set(stops)
    pad = pad_id(tokenizer)
    answers: list[str] = []
    with torch.no_grad(), _evaluating(model):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            texts = [generation_prompt(model_prompt(tokenizer, e.prompt, chat)) for e in chunk]
            prompts = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            for row, ids in enumerate(prompts):
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                       max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                       eos_token_id=list(stops) or None, pad_token_id=pad)
            for row in generated[:, width:].tolist():
                end = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
                text = tokenizer.decode(row[:end], skip_special_tokens=True)
                answers.append(text.split("\n", 1)[0].strip())
    return answers


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def exact_match(pred: str, gold: str) -> float:
    """1.0 when the stripped answers are identical: cased, as lm-eval-harness and HELM score it, so
    a lowercase answer to a task about capitals counts as wrong."""
    return float(pred.strip() == gold.strip())


def exact_match_ci(pred: str, gold: str) -> float:
    """1.0 when the answers agree with case and whitespace folded (the forgiving variant, by name)."""
    return float(_normalise(pred) == _normalise(gold))


def token_f1(pred: str, gold: str) -> float:
    """Harmonic mean of precision and recall over normalised word tokens (SQuAD style)."""
    p = re.findall(r"\w+", _normalise(pred))
    g = re.findall(r"\w+", _normalise(gold))
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


TEXT_METRICS = {"exact_match": exact_match, "exact_match_ci": exact_match_ci, "f1": token_f1}
"""Metrics of a generated answer against the gold one, by the name an objective uses."""


def text_scores(wanted: Sequence[str], answers: Sequence[str], examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """Per-example values of each wanted text metric (local backend and api client alike)."""
    return {name: np.array([fn(a, e.answer) for a, e in zip(answers, examples, strict=True)], dtype=np.float64)
            for name, fn in TEXT_METRICS.items() if name in wanted}


def choice_accuracy(model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int = 64,
                    chat: bool = False) -> np.ndarray:
    """Per-example 1.0 when the choice of lowest answer cross-entropy is the gold answer."""
    torch = _torch()
    pairs: list[tuple[str, str]] = []
    for e in examples:
        if not e.choices:
            raise TaskError(f"example {e.id or e.prompt[:30]!r} has no choices; choice accuracy needs a 'choices' list")
        if e.answer not in e.choices:
            raise TaskError(f"example {e.id or e.prompt[:30]!r}: answer {e.answer!r} is not among its choices")
        pairs.extend((e.prompt, c) for c in e.choices)
    with torch.no_grad(), _evaluating(model):
        ce = _teacher_forced(model, tokenizer, pairs, batch_size, chat).ce
    out = np.empty(len(examples), dtype=np.float64)
    at = 0
    for i, e in enumerate(examples):
        choices = e.choices or ()  # never empty: checked above
        out[i] = float(choices[int(np.argmin(ce[at : at + len(choices)]))] == e.answer)
        at += len(choices)
    return out
