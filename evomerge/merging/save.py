"""A found merge as files that serve like any fine-tune: a PEFT adapter or a Hugging Face checkpoint.

Both come from the `Merger`'s own code path, so what is written is the merge that was scored:
the adapter holds the factors `Merger.low_rank` gives (B·A is the engine's ΔW), the checkpoint
holds base + ΔW from `Merger.deltas`. The checkpoint is streamed: its safetensors header is written
from the base's shapes first, then each tensor as it is merged, so memory holds one merged tensor
(plus the resident LoRA factors), never a second model.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import torch

from evomerge.errors import RecipeError
from evomerge.merging.merger import Merger
from evomerge.recipe import MergeRecipe
from evomerge.repository import TensorReader

_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.gguf")


def _header(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    """A safetensors header for tensors laid out in the given order, padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        size = dtype.itemsize
        for d in shape:
            size *= d
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f: BinaryIO, tensor: torch.Tensor) -> None:
    f.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def save_checkpoint(merger: Merger, recipe: MergeRecipe, path: str | Path) -> Path:
    """Write base + ΔW of `recipe` as a Hugging Face directory (model.safetensors in the base's
    dtypes, plus the base's config and tokenizer files), one tensor in memory at a time."""
    repo = merger.repository
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    names = list(repo.base_files)
    with TensorReader() as reader, open(out / "model.safetensors", "wb") as f:
        views = {n: reader.get(repo.base_files, n) for n in names}  # zero-copy: dtypes and shapes for the header
        changed = merger.deltas(recipe, lambda n: views[n])
        pending = next(changed, None)
        f.write(_header((n, views[n].dtype, tuple(views[n].shape)) for n in names))
        for name in names:
            if pending is not None and pending[0] == name:
                merged = pending[1].add_(views[name].to(pending[1].device, torch.float32)).to(views[name].dtype)
                _write_tensor(f, merged)
                del merged
                pending = next(changed, None)
            else:
                _write_tensor(f, views[name])
    if pending is not None:  # `deltas` walks the base checkpoint's order; anything else is a bug, not bad input
        raise RecipeError(f"tensor {pending[0]} was merged out of the base checkpoint's order")
    for item in sorted(repo.base.iterdir()):
        if item.is_file() and not any(item.match(p) for p in _WEIGHT_FILES):
            shutil.copy2(item, out / item.name)
    return out


def save_adapter(merger: Merger, recipe: MergeRecipe, path: str | Path, base_name: str | None = None) -> Path:
    """Write `recipe` as one PEFT LoRA adapter (scaling 1, each module at its merged rank) that
    `PeftModel.from_pretrained(base, path)` loads; refuses methods that are not low-rank."""
    from evomerge._imports import require

    peft = require("peft", "exporting an adapter")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for target, b, a in merger.low_rank(recipe):
        module = target.removesuffix(".weight")
        ranks[module] = a.shape[0]
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous().cpu()
    if not ranks:
        raise RecipeError("the recipe changes no tensor (every weight is 0); there is no adapter to write")
    r = max(set(ranks.values()), key=list(ranks.values()).count)   # the commonest rank; the rest by pattern
    pattern = {m: k for m, k in ranks.items() if k != r}
    config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern,
                             alpha_pattern=dict(pattern), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                             base_model_name_or_path=str(base_name or merger.repository.base))
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    require("safetensors", "exporting an adapter")
    from safetensors.torch import save_file

    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
