"""RegMean for LoRA experts: each expert's A factor re-fit to the inputs of the tasks it serves.

Summing experts makes each one's update act on every other task's inputs too: measured on
smol-mini, the upper-casing expert's update capitalises the first-letter task's answers, and no
choice of per-expert scales separates them. RegMean (Jin et al., 2023) merges linear layers in
closed form instead, W = Σ_i W_i·G_i·(Σ_j G_j)⁻¹, with G_i the Gram matrix of the layer's inputs on
expert i's data (off-diagonals shrunk by λ), so that on each expert's inputs the merged layer
answers as that expert does. For adapters W_i = W_0 + s_i·B_i·A_i this is W_0 + Σ_i s_i·B_i·Ã_i with

    Ã_i = A_i·G_i·(Σ_j G_j)⁻¹,

still of rank r: an aligned expert is an ordinary adapter, so every merge method, the low-rank
population path and the adapter export work on it unchanged, and the search's α trims Ã_i and
β scales it (β = 1 for all is plain RegMean).

The user's experts come without their training data, so each task of the fit split is given to
the expert with the lowest cross-entropy of its answers and their end (`serving`); an expert that
serves no task gets the mean of the tasks' Grams (neither protected nor dropped: the search weighs
it). With one task every Gram is that task's and alignment is a uniform rescale, so it applies from
two tasks up. Inputs are a model's layer inputs on the text the experts were trained on (prompt,
answer, EOS; one forward pass over fit): first the base model's, then those of the first fit's
merge (`refit`). Each expert's own inputs on its tasks, tried instead, did worse (0.62 against
0.72 on smol-mini; benchmarks/regmean_inputs.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge import inference
from evomerge.errors import RepositoryError, TaskError
from evomerge.recipe import MergeRecipe
from evomerge.repository import ALIGNED_SUFFIX, Repository, TensorReader
from evomerge.tasks import Example

SHRINK = 0.9
"""RegMean's λ: G̃ = λ·G + (1 − λ)·diag(G), the paper's default (1: exact least squares, which a
few fit examples leave ill-posed; 0: a per-input-feature weighted average)."""
VERSION = 2
"""Bumped when the aligned factors change for the same inputs (the cache key holds it)."""
AlignedA = dict[str, dict[str, torch.Tensor]]
"""Expert -> A key -> its aligned A factor."""


def aligned_name(expert: str) -> str:
    return expert + ALIGNED_SUFFIX


def serving(engine: Any, experts: Sequence[str], fit: Sequence[Example], chat: bool = False,
            batch_size: int = 32) -> dict[str, str]:
    """Task -> the expert whose answers on the task's fit examples, with their end, have the lowest
    mean cross-entropy (each expert alone at full strength; ties go to the first name). The end
    counts where the tokenizer has one: on the tiny zoo the reversing expert, whose answer starts
    with the word's last letter and runs on, had a lower answer CE on `last_letter` than its own
    expert (1.18 against 1.21) and a far higher one with the end (3.94 against 0.81)."""
    tasks = sorted({e.task for e in fit})
    rows = {t: np.array([e.task == t for e in fit]) for t in tasks}
    try:
        stop = bool(inference.end_ids(engine.tokenizer))
    except TaskError:
        stop = False
    ce: dict[str, np.ndarray] = {}
    for name in experts:
        with engine.merged(MergeRecipe("task_arithmetic", (name,), (1.0,))) as model:
            scores = inference.answer_scores(model, engine.tokenizer, fit, batch_size, chat, stop=stop)
        ce[name] = scores.ce_stop if scores.ce_stop is not None else scores.ce
    return {t: min(experts, key=lambda n: (float(ce[n][rows[t]].mean()), n)) for t in tasks}


def task_weights(experts: Sequence[str], tasks: Sequence[str], serves: Mapping[str, str]) -> np.ndarray:
    """(experts, tasks): 1 where the expert serves the task, 1/T across the tasks for an expert that
    serves none (the mean of the tasks' Grams), else 0."""
    w = np.array([[float(serves[t] == e) for t in tasks] for e in experts])
    w[w.sum(1) == 0] = 1.0 / len(tasks)
    return w


class _Accumulator:
    """Per group of modules that read the same input (q/k/v; gate/up): Σ_j G_j, and per adapter
    row the weighted A·G and diag(G) it needs, accumulated batch by batch (never one G per expert)."""

    def __init__(self, a: torch.Tensor, expert_of_row: torch.Tensor) -> None:
        self.a = a                                   # (rows, in): every expert's A stacked
        self.expert_of_row = expert_of_row           # (rows,)
        self.ag = torch.zeros_like(a)                # Σ_x w·A·xᵀx
        self.diag = torch.zeros_like(a)              # Σ_x w·Σ_tokens x²  (per row's expert)

    def add(self, x: torch.Tensor, row_weights: torch.Tensor) -> None:
        self.ag += row_weights[:, None] * ((self.a @ x.T) @ x)
        self.diag += row_weights[:, None] * (x * x).sum(0)[None, :]


@torch.no_grad()
def aligned_factors(engine: Any, experts: Sequence[str], fit: Sequence[Example], serves: Mapping[str, str],
                    chat: bool = False, shrink: float = SHRINK, batch_size: int = 32,
                    source: Mapping[str, MergeRecipe] | None = None) -> AlignedA:
    """Expert -> A key -> Ã (float32, CPU) for every LoRA module of `experts`, from the layer inputs on
    `fit` of the base model, or per task of the merge `source` names for it; `serves` maps each task
    to its expert (`serving`)."""
    repo: Repository = engine.repository
    tasks = sorted(serves)
    weights = torch.tensor(task_weights(experts, tasks, serves), dtype=torch.float32)
    device = engine.device
    targets = sorted({t for e in experts for t in repo.expert(e).modules})
    accs: dict[str, _Accumulator] = {}
    with TensorReader() as reader:
        for target in targets:
            held = [(i, repo.expert(e).modules[target]) for i, e in enumerate(experts)
                    if target in repo.expert(e).modules]
            a = torch.cat([reader.get(repo.expert(experts[i]).files, m.a_key).to(device, torch.float32, copy=True)
                           for i, m in held])
            rows = torch.cat([torch.full((m.rank,), i) for i, m in held])
            accs[target] = _Accumulator(a, rows.to(device))
    sums: dict[str, torch.Tensor] = {}
    group_of: dict[str, str] = {}                    # target -> the first target reading its input
    state: dict[str, Any] = {}

    def hook(target: str):
        def pre(module: Any, args: tuple[Any, ...]) -> None:
            x = args[0][state["mask"]].float()       # (real tokens, in)
            # Modules fed the very same tensor share one Σ G; the tensor is held until the pass
            # ends, so no later input can take its address.
            ident = (args[0].data_ptr(), tuple(args[0].shape))
            group = group_of.setdefault(target, state["seen"].setdefault(ident, (target, args[0]))[0])
            if group == target:
                s = sums.get(target)
                sums[target] = x.T @ x * state["total"] if s is None else s.add_(x.T @ x, alpha=state["total"])
            accs[target].add(x, state["row_w"][target])
        return pre

    handles = [engine.model.get_submodule(t.removesuffix(".weight")).register_forward_pre_hook(hook(t))
               for t in targets]
    try:
        for j, task in enumerate(tasks):
            examples = [e for e in fit if e.task == task]
            column = weights[:, j].to(device)
            state["row_w"] = {t: column[acc.expert_of_row] for t, acc in accs.items()}
            state["total"] = float(weights[:, j].sum())
            with engine.merged((source or {}).get(task)) as model:
                for start in range(0, len(examples), batch_size):
                    chunk = examples[start: start + batch_size]
                    batch = inference.training_batch(engine.tokenizer, [(e.prompt, e.answer) for e in chunk], chat)
                    mask = batch["attention_mask"].to(device)
                    state.update(mask=mask.bool(), seen={})
                    model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return _solve(experts, repo, targets, accs, sums, group_of, shrink)


def _solve(experts: Sequence[str], repo: Repository, targets: Sequence[str], accs: Mapping[str, _Accumulator],
           sums: Mapping[str, torch.Tensor], group_of: Mapping[str, str], shrink: float) -> AlignedA:
    """Ãᵀ = (Σ G̃)⁻¹·(G̃_i·Aᵀ) per module, one Cholesky factor per group of modules sharing an input."""
    out: AlignedA = {e: {} for e in experts}
    factors: dict[str, torch.Tensor] = {}
    for target in targets:
        acc, group = accs[target], group_of[target]
        if group not in factors:
            s = sums[group].double()
            g = shrink * s
            g.diagonal().add_((1 - shrink) * s.diagonal())
            g.diagonal().add_(1e-6 * float(s.diagonal().mean()) + 1e-12)  # inputs a task never moves
            factors[group] = torch.linalg.cholesky(g)
        rhs = shrink * acc.ag.double() + (1 - shrink) * acc.a.double() * acc.diag.double()
        solved = torch.cholesky_solve(rhs.T, factors[group]).T.float().cpu()
        for i, e in enumerate(experts):
            module = repo.expert(e).modules.get(target)
            if module is not None:
                out[e][module.a_key] = solved[(acc.expert_of_row == i).cpu()].contiguous()
    return out


def cache_key(repo: Repository, experts: Sequence[str], fit: Sequence[Example], dtype: str | None, chat: bool,
              shrink: float = SHRINK) -> str:
    """What fixes the aligned factors: the experts' files (path, size, mtime), the fit examples, the
    scoring dtype, the prompt format, λ and `VERSION`."""
    files = []
    for name in [*experts, None]:
        paths = sorted(set(repo.expert(name).files.values())) if name else sorted(set(repo.base_files.values()))
        files.append([name, [(str(p.resolve()), (s := p.stat()).st_size, s.st_mtime_ns) for p in paths]])
    text = json.dumps([VERSION, files, [(e.task, e.prompt, e.answer) for e in fit], dtype, chat, shrink])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_aligned(repo: Repository, experts: Sequence[str], factors: Mapping[str, Mapping[str, torch.Tensor]],
                  serves: Mapping[str, str], out: Path, shrink: float = SHRINK) -> Path:
    """A repository at `out` (``zoo.json``) holding the source experts where they are and each
    aligned copy under ``experts/NAME@regmean/`` (the adapter config copied, A replaced, B kept),
    written into a temporary folder and renamed, so a crash never leaves half a repository."""
    from safetensors.torch import load_file, save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        listed: dict[str, Any] = {}
        for name in experts:
            e = repo.expert(name)
            spec = {"kind": e.kind, "task": e.task, "distractor": e.distractor}
            listed[name] = {"path": str(e.path.resolve()), **spec}
            folder = tmp / "experts" / aligned_name(name)
            folder.mkdir(parents=True)
            shutil.copy(e.path / "adapter_config.json", folder / "adapter_config.json")
            tensors: dict[str, torch.Tensor] = {}
            for path in sorted(set(e.files.values())):
                tensors.update(load_file(str(path)))
            for key, a in factors[name].items():
                tensors[key] = a.to(tensors[key].dtype)
            save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
            listed[aligned_name(name)] = {"path": f"experts/{aligned_name(name)}", **spec}
        manifest = {"base": str(repo.base.resolve()), "experts": listed, "preset": repo.preset,
                    "tasks": {t: {s: str(p.resolve()) for s, p in files.items()} for t, files in repo.tasks.items()},
                    "aligned": {"method": "regmean", "shrink": shrink, "serves": dict(serves),
                                "source": str(repo.root.resolve()) if repo.root else None}}
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "zoo.json").exists():
                raise
            shutil.rmtree(tmp)  # another process finished the same alignment first: keep its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def unalignable(repo: Repository, experts: Sequence[str], fit: Sequence[Example]) -> str | None:
    """Why `experts` cannot be aligned on `fit` (None: they can)."""
    full = [e for e in experts if repo.expert(e).kind != "lora"]
    if full:
        return f"RegMean alignment works on LoRA factors and {full[0]!r} is a full checkpoint"
    if len({e.task for e in fit}) < 2:
        return "RegMean alignment needs fit examples of two tasks or more (with one, it only rescales)"
    return None


def regmean_recipe(experts: Sequence[str]) -> MergeRecipe:
    """RegMean's own merge of aligned copies: each at full strength."""
    return MergeRecipe("task_arithmetic", tuple(experts), (1.0,) * len(experts))


def refit(repo: Repository, experts: Sequence[str], fit: Sequence[Example], serves: Mapping[str, str],
          factors: AlignedA, work: Path, device: str | None = None, dtype: str | None = None, chat: bool = False,
          batch_size: int = 32) -> AlignedA:
    """`factors` fit again on the layer inputs their own merge (`regmean_recipe`) gives on `fit`; the
    merge is written under `work` to be loaded, and only one model is held at a time."""
    from evomerge.merging.engine import MergeEngine

    first = write_aligned(repo, experts, factors, serves, work / "first")
    engine = MergeEngine(Repository.open(first), device=device, dtype=dtype)
    merge = regmean_recipe([aligned_name(e) for e in experts])
    try:
        return aligned_factors(engine, experts, fit, serves, chat, batch_size=batch_size,
                               source=dict.fromkeys(serves, merge))
    finally:
        engine.close()


def align_repository(repo: Repository, experts: Sequence[str], fit: Sequence[Example], cache: Path,
                     device: str | None = None, dtype: str | None = None, chat: bool = False,
                     batch_size: int = 32) -> tuple[Path, dict[str, str]]:
    """The aligned repository of `experts` on `fit` under `cache` (built once per `cache_key`) and
    the task each serves; every expert must be a LoRA adapter and `fit` must span two tasks.

    The factors are fit twice: on the base model's layer inputs, then on the inputs the first fit's
    merge gives each layer (RegMean++'s point, Nguyen et al. 2025: a layer of the merge reads what
    the merged layers below it write, not what the base's do). Measured on smol-mini in domain,
    RegMean alone went from 0.42 to 0.72 test exact match (experts on their own tasks 0.74); a
    third fit changed nothing (benchmarks/RESULTS.md)."""
    from evomerge.merging.engine import MergeEngine

    why = unalignable(repo, experts, fit)
    if why is not None:
        raise RepositoryError(why)
    out = cache / cache_key(repo, experts, fit, dtype, chat)
    if (out / "zoo.json").exists():
        return out, json.loads((out / "zoo.json").read_text())["aligned"]["serves"]
    engine = MergeEngine(repo, device=device, dtype=dtype)
    try:
        serves = serving(engine, experts, fit, chat, batch_size)
        factors = aligned_factors(engine, experts, fit, serves, chat, batch_size=batch_size)
    finally:
        engine.close()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=out.name + ".first.", dir=cache) as tmp:
        factors = refit(repo, experts, fit, serves, factors, Path(tmp), device, dtype, chat, batch_size)
    return write_aligned(repo, experts, factors, serves, out), serves
