"""Provider: 64 concurrent clients with distinct recipes, cross-recipe batching on against off.

Each of `--clients` real `openai` clients (AsyncOpenAI, one per client) sends one completion
request of `--batch` prompts (echo + logprobs, max_tokens 0: teacher-forced scoring, what a
search's CE needs) carrying its own `evo` recipe over all the repository's experts, all at once, to
a real `evomerge serve` process on 127.0.0.1. Run twice in one go, the same recipes and prompts:
with `--no-cross-recipe` (today's path: each recipe merged, then its requests scored in their own
forward) and with cross-recipe batching (waiting requests of distinct low-rank recipes share one
forward over the base weights, each recipe's rows served by its factors). Reports candidates
(distinct recipes answered) per second, `/v1/stats` (merges, forward passes) for the timed burst,
and the largest difference between the two runs' token logprobs.

    python -m benchmarks.provider_population [--repository DIR] [--clients 64] [--batch 8] [--torch-threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from benchmarks.provider_throughput import provider, recipes, repository
from evomerge.recipe import MergeRecipe
from evomerge.repository import Repository
from evomerge.zoo.generators import make_splits


async def burst(url: str, per_client: list[MergeRecipe | None], prompts: list[str]) -> tuple[float, list[list[float]]]:
    """Every client's request at once (None: the base model); (wall seconds, each client's token
    logprobs, flattened)."""
    import openai

    clients = [openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=1800) for _ in per_client]

    async def one(client: openai.AsyncOpenAI, recipe: MergeRecipe | None) -> list[float]:
        extra = {} if recipe is None else {"extra_body": {"merge": recipe.to_dict()}}
        out = await client.completions.create(model="base", prompt=prompts, max_tokens=0, echo=True, logprobs=0,
                                              **extra)
        return [lp for c in out.choices for lp in c.logprobs.token_logprobs if lp is not None]

    try:
        start = time.perf_counter()
        answers = await asyncio.gather(*(one(c, r) for c, r in zip(clients, per_client)))
        return time.perf_counter() - start, answers
    finally:
        for c in clients:
            await c.close()


def scenario(repo: Path, name: str, per_client: list[MergeRecipe], prompts: list[str], threads: int,
             extra: list[str]) -> tuple[dict, list[list[float]]]:
    with provider(repo, threads, ["--deadline", "1800", *extra]) as url:
        asyncio.run(burst(url, [None], prompts))  # warm: a first forward on the base model (not timed)
        before = httpx.get(url + "/stats").json()
        wall, answers = asyncio.run(burst(url, per_client, prompts))
        after = httpx.get(url + "/stats").json()
    stats = {k: round(after[k] - before[k], 3) for k in ("merges", "forward_passes", "texts_scored", "merge_seconds")}
    distinct = len({r.key() for r in per_client})
    return {"scenario": name, "clients": len(per_client), "distinct_recipes": distinct, "wall_s": round(wall, 2),
            "candidates_per_s": round(distinct / wall, 3), **stats}, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", help="a zoo or base/ + experts/ folder (default: the tiny zoo)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="prompts per request (upper_first examples)")
    ap.add_argument("--torch-threads", type=int, default=2)
    args = ap.parse_args()
    repo = repository(args.repository)
    experts = sorted(Repository.open(repo).experts)
    per_client = recipes(experts, args.clients)
    prompts = [e.prompt + e.answer for e in make_splits("upper_first", (0, args.batch, 0), seed=0)["search"]]
    load = [round(x, 2) for x in os.getloadavg()]
    off, off_answers = scenario(repo, "cross-recipe batching off (today's path)", per_client, prompts,
                                args.torch_threads, ["--no-cross-recipe"])
    on, on_answers = scenario(repo, "cross-recipe batching on", per_client, prompts, args.torch_threads, [])
    worst = max(abs(a - b) for x, y in zip(on_answers, off_answers) for a, b in zip(x, y))
    assert all(len(x) == len(y) for x, y in zip(on_answers, off_answers))
    print(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
                      "cpus": os.cpu_count(), "load_average_at_start": load,
                      "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "repository": str(repo),
                      "experts": len(experts), "torch_threads": args.torch_threads, "batch": args.batch,
                      "rows": [off, on], "ratio_on_vs_off": round(on["candidates_per_s"] / off["candidates_per_s"], 2),
                      "max_logprob_diff_on_vs_off": float(f"{worst:.2e}")}, indent=2))


if __name__ == "__main__":
    main()
