"""The llama.cpp provider profile of the api backend: searching through a server no one here wrote.

llama.cpp's server loads LoRA adapters on one base (``--lora a.gguf --lora b.gguf``) and takes a
scale per adapter in each request (``"lora": [{"id": 0, "scale": 0.5}, ...]``). Its output is
W·x + Σ scale_i·(alpha_i/r_i)·B_i·A_i·x, which is exactly evomerge's task-vector form ``evo_tv``
with α = 1 (and task arithmetic, linear and uniform, whose effective weights are the scales). So:
- the experts are the server's adapters (``GET /lora-adapters``, named by their file's stem);
- a candidate is the request's ``lora`` scales; the keep ratios α (and block-wise coefficients,
  TIES, DARE, evo's factor form) are not expressible, so a recipe or a search that needs them is
  refused in one line (search β only: space ``evo_joint`` with ``schedule: beta``);
- generated text (exact match, F1) comes from ``/v1/completions``; token log-probabilities of an
  answer from the same route with a grammar that admits only the answer (llama.cpp has no
  ``echo`` of prompt log-probabilities): the server decodes the answer token by token and reports
  each token's log-probability under the model, before the grammar's constraint. The tokens are
  the ones greedy decoding under the grammar picks: for a byte-level vocabulary the answer's only
  tokenization; with BPE the most likely path at each step, which can split the answer otherwise
  than tokenizing ``prompt + answer`` would (`evomerge.serve.protocol`'s rule), so a CE figure
  through llama.cpp is comparable with itself, not digit for digit with the reference provider's.
Every request holds one prompt: llama.cpp's usage of a many-prompt request counts only the first,
and the spend ledger needs every token counted. Prompt caching is off (``cache_prompt: false``):
each request is another merge, and the token counts then equal the server's own counters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from evomerge.errors import BackendError, ConfigError
from evomerge.recipe import METHODS, MergeRecipe, effective_weights
from evomerge.serve.protocol import answer_start, generation_prompt

PROVIDERS = ("auto", "evomerge", "llama.cpp")
BETA_ONLY = "search β only: space evo_joint with options {schedule: beta} (or a classic linear space)"


def server_root(api_base: str) -> str:
    """The server's own root (llama.cpp serves /lora-adapters and /props beside /v1)."""
    return api_base.rstrip("/").removesuffix("/v1")


def is_llamacpp(props: Any) -> bool:
    """Whether a ``GET /props`` answer is llama.cpp's (its default generation settings and build)."""
    return isinstance(props, dict) and "default_generation_settings" in props and "build_info" in props


def adapter_ids(listing: Any) -> dict[str, int]:
    """Expert name (the adapter file's stem) -> llama.cpp adapter id, from ``GET /lora-adapters``."""
    if not isinstance(listing, list) or not all(isinstance(a, dict) and "id" in a and "path" in a for a in listing):
        raise BackendError("llama.cpp's /lora-adapters answer is not a list of {id, path}; is this llama.cpp's server?")
    ids: dict[str, int] = {}
    for adapter in listing:
        name = PurePosixPath(str(adapter["path"]).replace("\\", "/")).stem
        if name in ids:
            raise BackendError(f"llama.cpp serves two adapters named {name!r}; give the adapter files distinct names")
        ids[name] = int(adapter["id"])
    if not ids:
        raise BackendError("llama.cpp's server has no LoRA adapter loaded; start it with --lora FILE.gguf per expert "
                           "(and --lora-init-without-apply)")
    return ids


def inexpressible(recipe: MergeRecipe) -> str | None:
    """Why llama.cpp cannot carry out `recipe`, or None when a scale per adapter is all it needs."""
    if METHODS[recipe.method].lora != "concat":  # a scale per adapter: what llama.cpp's ``lora`` carries
        return f"merge method {recipe.method!r} is not a scale per adapter"
    if recipe.densities is not None and any(d != 1.0 for d in recipe.densities):
        return "keep ratios α < 1 (sparsified adapters) are not expressible"
    if recipe.blocks:
        return "block-wise coefficients are not expressible"
    return None


def lora_field(recipe: MergeRecipe, ids: Mapping[str, int]) -> list[dict[str, float]]:
    """The request's ``lora`` list: each recipe expert's id and its scale (β × the recipe's scale)."""
    why = inexpressible(recipe)
    if why is not None:
        raise BackendError(f"llama.cpp takes one scale per adapter: {why}; {BETA_ONLY}")
    missing = [e for e in recipe.experts if e not in ids]
    if missing:
        raise BackendError(f"llama.cpp serves no adapter named {missing[0]!r}; it serves {', '.join(sorted(ids)[:10])}")
    weights = effective_weights(recipe.method, recipe.weights)
    return [{"id": ids[e], "scale": w * recipe.scale} for e, w in zip(recipe.experts, weights, strict=True)]


def space_error(name: str, options: Mapping[str, Any]) -> str | None:
    """One line refusing a search space llama.cpp cannot carry out (before any request), else None."""
    if name in ("linear", "task_arithmetic", "uniform"):
        return None
    if options.get("refine_groups"):
        return (f"space {name!r} with refine_groups scales each layer block apart, "
                f"and llama.cpp takes one scale per adapter; {BETA_ONLY}")
    if name in ("evo", "evo_joint"):
        method = options.get("method", "evo_tv" if name == "evo_joint" else "evo")
        if options.get("schedule", "joint" if name == "evo_joint" else "two_stage") == "beta" and method == "evo_tv":
            return None
        return (f"space {name!r} searches the keep ratios α (or evo's factor form), which llama.cpp's per-adapter "
                f"scales cannot express; {BETA_ONLY}, method evo_tv")
    return f"space {name!r} is not a scale per adapter, which is all llama.cpp's server takes; {BETA_ONLY}"


_GBNF_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def grammar_literal(text: str) -> str:
    """A GBNF grammar that admits exactly `text` (llama.cpp's escapes: \\" \\\\ \\n \\r \\t \\xHH)."""
    body = "".join(_GBNF_ESCAPES.get(ch) or (f"\\x{ord(ch):02X}" if ord(ch) < 0x20 else ch) for ch in text)
    return f'root ::= "{body}"'


def continuation(prompt: str, answer: str) -> str:
    """What the answer adds to the generation prompt: the prompt's trailing spaces, then the answer."""
    return prompt[answer_start(prompt):] + answer


def forced_fields(prompt: str, answer: str) -> dict[str, Any]:
    """Body fields that make the server decode `answer` after `prompt` and report its log-probabilities
    (each answer token takes at least one byte; one more token for the end of the grammar)."""
    text = continuation(prompt, answer)
    return {"prompt": generation_prompt(prompt), "grammar": grammar_literal(text),
            "max_tokens": len(text.encode("utf-8")) + 1, "logprobs": 1}


def forced_scores(content: Any, text: str) -> tuple[float, float]:
    """(mean NLL, greedy: 1.0 if each token was the model's top choice) of the tokens spelling `text`
    in a forced answer's ``logprobs.content``."""
    if not isinstance(content, list) or not content:
        raise ValueError("llama.cpp's answer lacks logprobs.content")
    spelled, picked, greedy = b"", [], True
    target = text.encode("utf-8")
    for token in content:
        if len(spelled) >= len(target):
            break
        spelled += bytes(token.get("bytes") or token["token"].encode("utf-8"))
        picked.append(float(token["logprob"]))
        top = [float(t["logprob"]) for t in token.get("top_logprobs") or ()]
        greedy = greedy and bool(top) and picked[-1] >= max(top) - 1e-6
    if not picked or not spelled.startswith(target):
        raise ValueError("llama.cpp's forced answer does not spell the answer (is the grammar ignored?)")
    return -math.fsum(picked) / len(picked), float(greedy)


def check_provider(provider: str) -> None:
    if provider not in PROVIDERS:
        raise ConfigError(f"api provider {provider!r} is unknown; choose one of {', '.join(PROVIDERS)}")
