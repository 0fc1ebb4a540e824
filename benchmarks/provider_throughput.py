"""Provider throughput under 64 concurrent clients: distinct recipes vs one shared recipe.

Each client sends `--requests` completions (echo + logprobs, `--batch` prompts, max_tokens 0) carrying
its recipe, to a real `evomerge serve` process. Reports requests/s, merged candidates/s and the server's merge count, which must be
exactly one per distinct recipe. Baseline from the same run: one client sending the distinct-recipe
requests one after another.

    /work/venv/bin/python -m benchmarks.provider_throughput [--repository DIR] [--clients 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import httpx

from evomerge.recipe import MergeRecipe

PROMPT = "Question: what colour is the sky? Answer: blue"


def repository(path: str | None) -> Path:
    if path:
        return Path(path)
    try:
        from evomerge.zoo import ensure_tiny

        return ensure_tiny()
    except ImportError:  # the zoo is not built in this checkout: use the tests' tiny repository
        from tests.helpers.bpe import build_tiny_repository

        return build_tiny_repository(Path(tempfile.mkdtemp()) / "tiny_repo")


def recipes(experts: list[str], n: int) -> list[MergeRecipe]:
    """`n` distinct evo recipes over all experts (β spread over [-1, 1], α over [0.3, 1])."""
    k = len(experts)
    return [MergeRecipe("evo", tuple(experts), tuple(round(-1 + 2 * ((i + j * n // k) % n) / max(1, n - 1), 6)
                                                      for j in range(k)),
                        tuple(0.3 + 0.7 * ((i + j) % 5) / 4 for j in range(k))) for i in range(n)]


async def drive(url: str, per_client: list[MergeRecipe], requests: int, batch: int) -> float:
    limits = httpx.Limits(max_connections=len(per_client) + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        async def one(recipe: MergeRecipe) -> None:
            for _ in range(requests):
                r = await client.post("/completions", json={"prompt": [PROMPT] * batch, "max_tokens": 0, "echo": True,
                                                            "logprobs": 0, "merge": recipe.to_dict()})
                r.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in per_client))
        return time.perf_counter() - start


@contextlib.contextmanager
def provider(repo: Path, threads: int, extra: Sequence[str] = ()) -> Iterator[str]:
    """A real `evomerge serve` process (its own GIL, as deployed), stopped at the end; `extra`:
    more `evomerge serve` flags."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "evomerge", "serve", "--repository", str(repo),
                             "--port", str(port), "--torch-threads", str(threads), *extra], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            try:
                httpx.get(url + "/models")
                break
            except httpx.ConnectError:
                if proc.poll() is not None:
                    raise SystemExit("the provider did not start")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def scenario(repo: Path, name: str, per_client: list[MergeRecipe], requests: int, batch: int, threads: int,
             sequential: bool = False) -> dict:
    with provider(repo, threads) as url:
        if sequential:
            wall = sum(asyncio.run(drive(url, [r], requests, batch)) for r in per_client)
        else:
            wall = asyncio.run(drive(url, per_client, requests, batch))
        stats = httpx.get(url + "/stats").json()
    total = len(per_client) * requests
    distinct = len({r.key() for r in per_client})
    return {"scenario": name, "clients": 1 if sequential else len(per_client), "requests": total,
            "wall_s": round(wall, 3), "requests_per_s": round(total / wall, 2),
            "merged_candidates_per_s": round(stats["merges"] / wall, 2), "distinct_recipes": distinct,
            "merges": stats["merges"], "exactly_one_merge_per_recipe": stats["merges"] == distinct,
            "forward_passes": stats["forward_passes"], "merge_seconds": stats["merge_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repository")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--batch", type=int, default=8, help="prompts per request")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads (1: a loaded 2-core machine runs a small model far faster)")
    args = ap.parse_args()
    repo = repository(args.repository)
    experts = sorted(p.name for p in (repo / "experts").iterdir())
    distinct = recipes(experts, args.clients)
    t = args.torch_threads
    rows = [scenario(repo, "sequential, distinct recipes (baseline)", distinct, args.requests, args.batch, t, True),
            scenario(repo, f"{args.clients} clients, distinct recipes", distinct, args.requests, args.batch, t),
            scenario(repo, f"{args.clients} clients, one shared recipe", [distinct[0]] * args.clients,
                     args.requests, args.batch, t)]
    rows[1]["speedup_vs_sequential"] = round(rows[1]["requests_per_s"] / rows[0]["requests_per_s"], 2)
    print(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
                      "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
                      "processor": platform.processor() or platform.machine(), "repository": str(repo),
                      "experts": len(experts), "torch_threads": args.torch_threads, "batch": args.batch,
                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
