"""A `ModelHost` over a base model and PEFT LoRA experts, merged in memory by the factor math.

The provider's own fallback, independent of the local backend's engine: it reads each adapter's
``adapter_config.json`` and ``adapter_model.safetensors`` once, and keeps a merged state as low-rank
factors per module (B, A), so a cached candidate costs kilobytes and activating it is one matmul
per module. Methods: evo, evo_tv, task_arithmetic, linear, uniform (see `evomerge.recipe`);
others are refused with a 422 naming ``merge.method``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from evomerge._imports import require
from evomerge.blocks import block_of
from evomerge.errors import RecipeError, RepositoryError
from evomerge.recipe import MergeRecipe
from evomerge.serve.host import Generated, Scored, TransformersRunner

SUPPORTED = ("evo", "evo_tv", "task_arithmetic", "linear", "uniform")

Factors = dict[str, tuple[Any, Any]]
"""Module name -> (B, A) with ΔW = B @ A (the LoRA scaling folded into B)."""


def _load_adapter(path: Path, torch: Any) -> dict[str, tuple[Any, Any]]:
    """Module name -> (scaling·B, A) of one PEFT LoRA adapter."""
    st = require("safetensors.torch", "evomerge serve", "safetensors")
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
        tensors = st.load_file(str(path / "adapter_model.safetensors"))
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"cannot read LoRA adapter {path}: {exc}; expected adapter_config.json "
                              "and adapter_model.safetensors (PEFT's save_pretrained)") from None
    r = int(cfg["r"])
    scaling = cfg.get("lora_alpha", r) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    out: dict[str, tuple[Any, Any]] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        out[module] = (b.float() * scaling, a.float())
    if not out:
        raise RepositoryError(f"{path} holds no lora_A/lora_B tensors; is it a PEFT LoRA adapter?")
    return out


def _keep_top(a: Any, ratio: float, torch: Any) -> Any:
    """S_α(A): the round(α·numel) largest-magnitude entries of A, the rest zero, no rescaling."""
    k = round(ratio * a.numel())
    if k >= a.numel():
        return a
    flat = torch.zeros(a.numel(), dtype=a.dtype)
    if k > 0:
        idx = a.abs().flatten().topk(k).indices
        flat[idx] = a.flatten()[idx]
    return flat.view_as(a)


class LoraHost:
    """Base model + LoRA experts in memory; `merge` builds factors, `activate` patches weights."""

    def __init__(self, base_dir: str | Path, experts: Mapping[str, str | Path], base_name: str = "base") -> None:
        self.torch = torch = require("torch", "evomerge serve")
        tf = require("transformers", "evomerge serve")
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
            tokenizer = tf.AutoTokenizer.from_pretrained(str(base_dir))
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"cannot load the base model from {base_dir}: {exc}") from None
        self.runner = TransformersRunner(model, tokenizer)
        self.base_name = base_name
        self.experts = tuple(experts)
        self._adapters = {name: _load_adapter(Path(p), torch) for name, p in experts.items()}
        modules = dict(model.named_modules())
        targets = sorted({m for ad in self._adapters.values() for m in ad})
        missing = [m for m in targets if m not in modules]
        if missing:
            raise RepositoryError(f"adapters target modules the base lacks (e.g. {missing[0]}); "
                                  "were they trained on this base?")
        self._weights = {m: modules[m].weight for m in targets}
        self._base = {m: w.detach().clone() for m, w in self._weights.items()}

    @classmethod
    def from_repository(cls, directory: str | Path) -> "LoraHost":
        """Open a repository laid out as DIR/base (HF model dir) and DIR/experts/NAME (PEFT adapters)."""
        root = Path(directory)
        if not (root / "base").is_dir():
            raise RepositoryError(f"{root} has no base/ folder; a repository holds base/ and experts/NAME/")
        experts = {p.name: p for p in sorted((root / "experts").glob("*")) if (p / "adapter_config.json").is_file()}
        if not experts:
            raise RepositoryError(f"{root / 'experts'} holds no PEFT LoRA adapters")
        return cls(root / "base", experts)

    def check(self, recipe: MergeRecipe) -> None:
        if recipe.method not in SUPPORTED:
            raise RecipeError(f"merge.method {recipe.method!r} is not served here; choose one of {', '.join(SUPPORTED)}")
        unknown = [e for e in recipe.experts if e not in self._adapters]
        if unknown:
            raise RecipeError(f"merge.experts names unknown expert(s) {unknown}; GET /v1/models lists them")
        if recipe.method == "evo":
            ranks = {a.shape[0] for e in recipe.experts for _, a in self._adapters[e].values()}
            if len(ranks) > 1:
                raise RecipeError("merge.method 'evo' sums LoRA A factors, so its experts need one rank; "
                                  "use 'evo_tv' for experts of different ranks")
        if recipe.method == "linear" and abs(sum(recipe.weights)) < 1e-12:
            raise RecipeError("merge.weights of a 'linear' merge sum to zero; they are normalised by their sum")

    def merge(self, recipe: MergeRecipe) -> Factors:
        torch = self.torch
        names = [b.name for b in recipe.blocks]
        out: Factors = {}
        for module in self._weights:
            w, d = recipe.coefficients(block_of(module, names))
            parts = [(wi, di, self._adapters[e][module]) for wi, di, e in
                     zip(w, d or (1.0,) * len(w), recipe.experts) if module in self._adapters[e]]
            if not parts:
                continue
            if recipe.method == "evo":
                b = sum(wi * bi for wi, _, (bi, _) in parts)
                a = sum(wi * _keep_top(ai, di, torch) for wi, di, (_, ai) in parts)
                out[module] = (recipe.scale * b, a)
                continue
            if recipe.method == "uniform":
                coef = [1.0 / len(recipe.experts)] * len(parts)
            elif recipe.method == "linear":
                coef = [wi / sum(w) for wi, _, _ in parts]
            else:
                coef = [wi for wi, _, _ in parts]
            sparse = recipe.method == "evo_tv"
            b = torch.cat([c * bi for c, (_, _, (bi, _)) in zip(coef, parts)], dim=1)
            a = torch.cat([_keep_top(ai, di, torch) if sparse else ai for _, di, (_, ai) in parts], dim=0)
            out[module] = (recipe.scale * b, a)
        return out

    def activate(self, state: Factors | None) -> None:
        with self.torch.no_grad():
            for module, weight in self._weights.items():
                base = self._base[module]
                if state is not None and module in state:
                    b, a = state[module]
                    weight.copy_(base + (b @ a).to(base.dtype))
                else:
                    weight.copy_(base)

    def score(self, texts: Sequence[str], top: int = 0) -> list[Scored]:
        return self.runner.score(texts, top)

    def generate(self, prompt: str, max_tokens: int, temperature: float, seed: int | None) -> Generated:
        return self.runner.generate(prompt, max_tokens, temperature, seed)

    def count_tokens(self, text: str) -> int:
        return self.runner.count_tokens(text)
