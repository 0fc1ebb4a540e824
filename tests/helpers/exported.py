"""Logits of one prompt through a merge as evomerge scores it and through what an export wrote,
for tests that the shipped model is the scored one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evomerge.recipe import MergeRecipe
from evomerge.repository import Repository

TEXT = "Question: what colour is the sky? Answer:"


def merged_logits(repo: Path, recipe: MergeRecipe) -> torch.Tensor:
    """The logits of `recipe` merged by evomerge's engine over the repository at `repo`."""
    from evomerge.merging import MergeEngine

    engine = MergeEngine(Repository.open(repo), device="cpu", dtype="float32")
    try:
        with engine.merged(recipe) as model, torch.no_grad():
            return model(**engine.tokenizer(TEXT, return_tensors="pt")).logits
    finally:
        engine.close()


def logits_of(model: Any, repo: Path) -> torch.Tensor:
    """The logits of a model an export wrote (loaded by peft or transformers), with the repository's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(repo / "base"))
    with torch.no_grad():
        return model.eval()(**tok(TEXT, return_tensors="pt")).logits
