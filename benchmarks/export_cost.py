"""Time and peak memory of exporting a found merge: the PEFT adapter and the merged checkpoint.

Builds (once, under --workdir, with `merge_speed`'s builders) a model of SmolLM2-135M's shape with
random weights and --lora PEFT adapters (r=8 on every linear of every layer), then, each in a
fresh process, exports an `evo_tv` recipe over all adapters (every α < 1, so A is pruned) as an
adapter and as a checkpoint, reporting seconds, peak anonymous memory (the merge's own buffers
plus the resident LoRA factors) and peak file-backed pages (the memory-mapped base read once).

Usage: python benchmarks/export_cost.py [--workdir /tmp/evobench] [--lora 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.merge_speed import PeakMemory, ensure_zoo  # noqa: E402
from evomerge.recipe import MergeRecipe  # noqa: E402
from evomerge.repository import Repository  # noqa: E402


def child(work: Path, n: int, kind: str) -> None:
    """One export in this fresh process; prints a JSON line."""
    from evomerge.export import write_model

    names = [f"l{k}" for k in range(n)]
    repo = Repository.from_paths(work / "base", experts=[work / "lora" / x for x in names], check_finite=False)
    recipe = MergeRecipe("evo_tv", tuple(names), tuple((-1) ** k * 0.05 for k in range(n)),
                         tuple(0.5 + 0.4 * k / n for k in range(n)))
    out = work / "export" / kind
    with PeakMemory() as peak:
        start = time.perf_counter()
        write_model(recipe, repo, **{kind: out})
        seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(json.dumps({"export": kind, "adapters": n, "seconds": round(seconds, 2), "peak_anon_mib": round(peak.anon),
                      "peak_file_mib": round(peak.file), "written_mib": round(size)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/evobench"))
    ap.add_argument("--lora", type=int, default=32)
    ap.add_argument("--child", choices=["adapter", "model"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.workdir, args.lora, args.child)
    ensure_zoo(args.workdir, 0, args.lora)
    for kind in ("adapter", "model"):
        done = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--lora", str(args.lora),
                               "--child", kind], capture_output=True, text=True, check=True)
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
