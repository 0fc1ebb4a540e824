"""A base model and its experts on disk, checked once up front so a search never dies mid-way.

Layout written by `evomerge zoo` (``zoo.json`` beside ``base/``, ``experts/NAME/`` and
``tasks/TASK/{train,search,test}.jsonl``), or any base directory plus expert directories a user
already has (`Repository.from_paths`). An expert is a PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``) or a full Hugging Face checkpoint (``*.safetensors``).

Tensors stay on disk, memory-mapped and viewed one at a time (`TensorReader`), so opening a
repository of 100+ experts costs only their headers (plus one finiteness scan per tensor), and a
merge holds a few tensors of anonymous memory whatever the number of experts.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from evomerge._imports import require
from evomerge.errors import RepositoryError

ALIGNED_SUFFIX = "@regmean"
"""An expert's RegMean-aligned copy is named its name plus this (`evomerge.merging.regmean`)."""
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: where its factors live and the factor ``scaling`` (alpha/r)."""

    target: str      # the base tensor it updates, e.g. model.layers.0.self_attn.q_proj.weight
    a_key: str
    b_key: str
    rank: int
    scaling: float


@dataclass(frozen=True)
class Expert:
    """One expert of a repository; ``modules`` is set for LoRA adapters only."""

    name: str
    path: Path
    kind: str                         # "lora" or "full"
    task: str | None = None
    distractor: bool = False
    files: Mapping[str, Path] = field(default_factory=dict)          # tensor key -> file
    modules: Mapping[str, LoraModule] = field(default_factory=dict)  # target -> module


def _safetensors_files(directory: Path, what: str) -> dict[str, Path]:
    """Map each tensor key of a checkpoint directory to the file holding it."""
    safe_open = require("safetensors", "reading checkpoints").safe_open
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise RepositoryError(f"{what}: no *.safetensors file in {directory}; save it with safe_serialization")
    out: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                out.update(dict.fromkeys(h.keys(), f))
        except Exception as exc:  # safetensors raises its own error types for a corrupt header
            raise RepositoryError(f"{what}: cannot read {f} ({exc})") from None
    return out


def _shapes(files: Mapping[str, Path]) -> dict[str, tuple[int, ...]]:
    safe_open = require("safetensors", "reading checkpoints").safe_open
    out: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for key, f in files.items():
        by_file.setdefault(f, []).append(key)
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            for key in keys:
                out[key] = tuple(h.get_slice(key).get_shape())
    return out


def _check_finite(expert: str, files: Mapping[str, Path]) -> None:
    """Reject a checkpoint holding NaN or inf, naming the tensor (one tensor in memory at a time)."""
    torch = require("torch", "checking expert tensors")
    safe_open = require("safetensors", "reading checkpoints").safe_open
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in set(files.values())}
        for key, f in files.items():
            t = handles[f].get_tensor(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise RepositoryError(f"expert {expert!r}: tensor {key} holds NaN or inf; re-export the expert")


def _match_pattern(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the module name's tail."""
    for pat, value in patterns.items():
        if re.search(rf"(^|\.){pat}$", module):
            return value
    return default


def _lora_modules(name: str, directory: Path, files: Mapping[str, Path],
                  base_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, LoraModule]:
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RepositoryError(f"expert {name!r}: unreadable adapter_config.json ({exc})") from None
    for flag, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan-in-fan-out layers"), ("lora_bias", "LoRA biases")):
        if config.get(flag):
            raise RepositoryError(f"expert {name!r}: {why} adapters are not supported; use plain LoRA")
    shapes = _shapes(files)
    factors: dict[str, dict[str, str]] = {}
    for key in files:
        m = _LORA_KEY.match(key)
        if m is None:
            raise RepositoryError(f"expert {name!r}: tensor {key} is not a LoRA factor "
                                  "(embedding LoRA and modules_to_save are not supported)")
        factors.setdefault(m["module"], {})[m["part"]] = key
    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", config.get("r", 8)))
    out: dict[str, LoraModule] = {}
    for module, parts in sorted(factors.items()):
        if set(parts) != {"A", "B"}:
            raise RepositoryError(f"expert {name!r}: module {module} has lora_{next(iter(parts))} without its partner")
        target = module + ".weight"
        if target not in base_shapes:
            raise RepositoryError(f"expert {name!r}: target module {module} does not exist in the base model")
        rank = int(_match_pattern(config.get("rank_pattern") or {}, module, r0))
        alpha = float(_match_pattern(config.get("alpha_pattern") or {}, module, alpha0))
        a, b = shapes[parts["A"]], shapes[parts["B"]]
        out_f, in_f = base_shapes[target]
        if a != (rank, in_f) or b != (out_f, rank):
            raise RepositoryError(f"expert {name!r}: tensor {parts['A']} {a} / {parts['B']} {b} do not fit rank {rank} "
                                  f"over base {target} {base_shapes[target]}; the adapter was trained on another base")
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        out[target] = LoraModule(target, parts["A"], parts["B"], rank, scaling)
    if not out:
        raise RepositoryError(f"expert {name!r}: the adapter holds no LoRA factors")
    return out


@dataclass(frozen=True)
class Repository:
    """A validated base model plus named experts; tasks when it came from a zoo."""

    root: Path | None
    base: Path
    base_files: Mapping[str, Path]
    base_shapes: Mapping[str, tuple[int, ...]]
    experts: Mapping[str, Expert]
    tasks: Mapping[str, Mapping[str, Path]] = field(default_factory=dict)
    preset: str | None = None

    @classmethod
    def open(cls, path: str | Path, check_finite: bool = True) -> Repository:
        """Open a directory: a zoo (``zoo.json``) or a base model with an ``experts/`` folder."""
        root = Path(path)
        manifest = root / "zoo.json"
        if not manifest.exists():
            if (root / "base").is_dir() and (root / "experts").is_dir():
                return cls.from_paths(root / "base", experts_dir=root / "experts", check_finite=check_finite)
            raise RepositoryError(f"{root} has no zoo.json and no base/ + experts/ folders; "
                                  "build one with `evomerge zoo`")
        try:
            data = json.loads(manifest.read_text())
            specs = {n: (root / e["path"], e.get("kind"), e.get("task"), bool(e.get("distractor", False)))
                     for n, e in data["experts"].items()}
            tasks = {t: {s: root / p for s, p in splits.items()} for t, splits in (data.get("tasks") or {}).items()}
            base = root / data.get("base", "base")
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise RepositoryError(f"{manifest} is malformed ({type(exc).__name__}: {exc})") from None
        return cls._build(root, base, specs, tasks, data.get("preset"), check_finite)

    @classmethod
    def from_paths(cls, base: str | Path, experts: Sequence[str | Path] = (), experts_dir: str | Path | None = None,
                   check_finite: bool = True) -> Repository:
        """A repository from a base directory and expert directories (named by their folder)."""
        dirs = [Path(p) for p in experts]
        if experts_dir is not None:
            folder = Path(experts_dir)
            if not folder.is_dir():
                raise RepositoryError(f"experts folder {folder} does not exist")
            dirs += sorted(p for p in folder.iterdir() if p.is_dir())
        if not dirs:
            raise RepositoryError("no experts given; pass expert directories or a folder holding them")
        specs: dict[str, tuple[Path, str | None, str | None, bool]] = {}
        for d in dirs:
            if d.name in specs:
                raise RepositoryError(f"two experts are named {d.name!r}; expert folders need distinct names")
            specs[d.name] = (d, None, None, False)
        return cls._build(None, Path(base), specs, {}, None, check_finite)

    @classmethod
    def _build(cls, root: Path | None, base: Path, specs: Mapping[str, tuple[Path, str | None, str | None, bool]],
               tasks: Mapping[str, Mapping[str, Path]], preset: str | None, check_finite: bool) -> Repository:
        if not (base / "config.json").exists():
            raise RepositoryError(f"base model {base} has no config.json; point to a Hugging Face model directory")
        base_files = _safetensors_files(base, "base model")
        base_shapes = _shapes(base_files)
        base_config = json.loads((base / "config.json").read_text())
        experts: dict[str, Expert] = {}
        for name, (path, kind, task, distractor) in specs.items():
            if not path.is_dir():
                raise RepositoryError(f"expert {name!r}: directory {path} does not exist")
            detected = "lora" if (path / "adapter_config.json").exists() else "full"
            if kind is not None and kind != detected:
                raise RepositoryError(f"expert {name!r} is listed as {kind} but {path} holds a {detected} checkpoint")
            files = _safetensors_files(path, f"expert {name!r}")
            if detected == "lora":
                modules = _lora_modules(name, path, files, base_shapes)
            else:
                modules = {}
                _check_full(name, path, files, base_shapes, base_config)
            if check_finite:
                _check_finite(name, files)
            experts[name] = Expert(name, path, detected, task, distractor, files, modules)
        return cls(root, base, base_files, base_shapes, experts, tasks, preset)

    def expert(self, name: str) -> Expert:
        try:
            return self.experts[name]
        except KeyError:
            more = " ..." if len(self.experts) > 10 else ""
            raise RepositoryError(f"no expert named {name!r} in the repository; known: "
                                  f"{', '.join(sorted(self.experts)[:10])}{more}") from None

    @property
    def block_layers(self) -> int:
        """Number of decoder layers of the base (for naming blocks)."""
        config = json.loads((self.base / "config.json").read_text())
        return int(config.get("num_hidden_layers", 0))


def _check_full(name: str, path: Path, files: Mapping[str, Path], base_shapes: Mapping[str, tuple[int, ...]],
                base_config: Mapping[str, object]) -> None:
    config_path = path / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
            if key in base_config and key in config and config[key] != base_config[key]:
                raise RepositoryError(f"expert {name!r}: architecture differs from the base ({key} "
                                      f"{config[key]} vs {base_config[key]}); experts must be fine-tuned from the base")
    missing = set(base_shapes) - set(files)
    extra = set(files) - set(base_shapes)
    if missing or extra:
        key = sorted(missing or extra)[0]
        raise RepositoryError(f"expert {name!r}: tensor {key} is {'missing' if missing else 'not in the base'}; "
                              "a full expert must hold exactly the base's tensors")
    for key, shape in _shapes(files).items():
        if shape != base_shapes[key]:
            raise RepositoryError(f"expert {name!r}: tensor {key} has shape {shape}, the base has {base_shapes[key]}")


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class TensorReader:
    """Zero-copy views of single tensors in many safetensors files, through one memory map per file.

    A view copies nothing: a merge reads each expert's bytes straight from the page cache, so
    applying a candidate costs one pass over them instead of a read into a fresh buffer and then
    the pass. The pages it touches count as the process's file-backed RSS; they are clean, shared
    with the page cache and dropped by the kernel under pressure, so anonymous memory stays that of
    a few tensors whatever the number of experts. Maps are private (``ACCESS_COPY``): a write to a
    view would copy the page, never reach the file; the merger never writes to them.
    """

    def __init__(self) -> None:
        self._maps: dict[Path, tuple[mmap.mmap, int, dict]] = {}

    def _open(self, f: Path) -> tuple[mmap.mmap, int, dict]:
        entry = self._maps.get(f)
        if entry is None:
            with open(f, "rb") as fh:
                if os.fstat(fh.fileno()).st_size < 8:
                    raise RepositoryError(f"{f}: shorter than a safetensors header; the file is truncated")
                m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            (size,) = struct.unpack_from("<Q", m, 0)
            entry = self._maps[f] = (m, 8 + size, json.loads(m[8:8 + size]))
        return entry

    def get(self, files: Mapping[str, Path], key: str):
        """A CPU tensor viewing `key`'s bytes in place; copy it before writing to it."""
        torch = require("torch", "reading checkpoints")
        f = files[key]
        m, start, header = self._open(f)
        entry = header[key]
        if entry["dtype"] not in _DTYPES:
            raise RepositoryError(f"{f}: tensor {key} has dtype {entry['dtype']}, which evomerge cannot read")
        dtype = getattr(torch, _DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        numel = math.prod(entry["shape"])
        if numel * dtype.itemsize != end - begin:
            raise RepositoryError(f"{f}: tensor {key} claims {end - begin} bytes for shape {entry['shape']}; "
                                  "the file is corrupt")
        if start + end > len(m):
            raise RepositoryError(f"{f}: file ends inside tensor {key}; the file is truncated")
        if numel == 0:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(m, dtype=dtype, count=numel, offset=start + begin).view(entry["shape"])

    def close(self) -> None:
        """Forget the maps; each unmaps once no view of it is left."""
        self._maps.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
