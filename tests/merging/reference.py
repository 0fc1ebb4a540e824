"""Float64 reference merges written straight from the definitions, independent of evomerge.merging."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def tensors(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update({k: v.astype(np.float64) for k, v in load_file(str(f)).items()})
    return out


def top_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest |x|; ties go to the lower flat index (stable descending sort)."""
    flat = np.abs(x.reshape(-1).astype(np.float32))
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(x.shape)


def k_round(n: int, a: float) -> int:
    return n if a >= 1 else (0 if a <= 0 else min(n, int(math.floor(a * n + 0.5))))


def k_floor(n: int, d: float) -> int:
    return n if d >= 1 else (0 if d <= 0 else max(1, int(d * n)))


def task_vectors(repo_dir: Path, names: list[str]) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    base = tensors(repo_dir / "base")
    taus = []
    for n in names:
        e = tensors(repo_dir / "experts" / n)
        taus.append({k: e[k] - base[k] for k in base})
    return base, taus


def ties(taus: list[np.ndarray], weights: list[float], densities: list[float], by_count: bool = False) -> np.ndarray:
    """TIES (mergekit's normalised form); `by_count`: evo_ties, the agreeing mean over how many agree."""
    trimmed = [w * t * top_mask(t, k_floor(t.size, d)) for t, w, d in zip(taus, weights, densities)]
    elected = np.where(sum(trimmed) >= 0, 1.0, -1.0)
    agree = [np.sign(t) == elected for t in trimmed]
    num = sum(t * a for t, a in zip(trimmed, agree))
    den = sum((1.0 if by_count else w) * a for w, a in zip(weights, agree))
    den = np.where(den == 0, 1.0, den)
    return num / den


def lora_factors(expert_dir: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    cfg = json.loads((expert_dir / "adapter_config.json").read_text())
    raw = tensors(expert_dir)
    out = {}
    for k, a in raw.items():
        if ".lora_A." in k:
            target = k.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
            out[target] = (a, raw[k.replace("lora_A", "lora_B")])
    return out, cfg["lora_alpha"] / cfg["r"]
