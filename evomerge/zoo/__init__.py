"""The model zoo: a base model, LoRA experts and task files, so merges can be searched offline.

`build(preset, out, seed)` makes one (`tiny`: a byte-level Llama trained here in about two
minutes, for tests and the demo; `smol`: SmolLM2-135M-Instruct with real LoRA experts). Heavy
packages load only when a build runs.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["build", "cache_dir", "default_tiny_dir", "ensure_tiny"]


def cache_dir() -> Path:
    """$EVOMERGE_CACHE, else ~/.cache/evomerge."""
    return Path(os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge").expanduser()


def default_tiny_dir(seed: int = 0) -> Path:
    """Where the shared tiny zoo of a seed lives."""
    return cache_dir() / "zoo" / f"tiny-{seed}"


def build(preset: str = "tiny", out: str | Path | None = None, seed: int = 0, **options) -> Path:
    """Build or reuse a zoo; see `evomerge.zoo.builder.build` for the options."""
    from evomerge.zoo.builder import build as _build

    return _build(preset, out, seed, **options)


def ensure_tiny(seed: int = 0, progress: bool = True) -> Path:
    """The tiny zoo of `seed`, built into `default_tiny_dir` on first use (minutes: say so first)."""
    from evomerge.zoo.builder import is_built

    out = default_tiny_dir(seed)
    if not is_built(out, "tiny", seed):
        print(f"building the tiny demo zoo in {out} (first use only; a few minutes on 2 CPU cores)", flush=True)
    return build("tiny", out, seed, progress=progress)
