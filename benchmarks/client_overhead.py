"""Client-side cost of `ApiBackend` per query, and the concurrency it holds against a slow provider.

1. Overhead: against a trivial endpoint (a fixed completions JSON, no model) in its own process,
   time `ApiBackend.evaluate` of one example (= one query) and, as the baseline from the same run,
   a bare `httpx.Client.post` of the same body; the difference is evomerge's overhead per query.
2. In-flight: against an endpoint that sleeps `--delay` s per request, evaluate 4×C one-example
   queries with `--concurrency` C; report the peak in flight seen by the client and by the server.

    /work/venv/bin/python -m benchmarks.client_overhead
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import httpx

from evomerge.backends.remote import ApiBackend
from evomerge.recipe import MergeRecipe
from evomerge.tasks import Example

ANSWER = json.dumps({"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "base",
                     "choices": [{"index": 0, "text": "Q: A", "finish_reason": "length",
                                  "logprobs": {"tokens": ["Q", ":", " A"], "token_logprobs": [None, -1.0, -2.0],
                                               "text_offset": [0, 1, 2], "top_logprobs": None}}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}}).encode()
MODELS = b'{"object":"list","data":[{"id":"base","object":"model"}]}'


def trivial_app(delay: float):
    state = {"in_flight": 0, "peak": 0}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        body = MODELS
        if scope["path"].endswith("/stats"):
            body = json.dumps(state).encode()
        elif scope["path"].endswith("/completions"):
            state["in_flight"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
            if delay:
                await asyncio.sleep(delay)
            state["in_flight"] -= 1
            body = ANSWER
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


def endpoint(delay: float) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.client_overhead", "--serve", str(port), "--delay", str(delay)])
    url = f"http://127.0.0.1:{port}/v1"
    while True:
        try:
            httpx.get(url + "/models")
            return proc, url
        except httpx.ConnectError:
            time.sleep(0.1)


def overhead(n: int) -> dict:
    proc, url = endpoint(0.0)
    try:
        example = [Example("Q:", " A", id="1")]
        recipe = MergeRecipe("evo", ("base",), (1.0,), (1.0,))
        body = {"model": "base", "prompt": ["Q: A"], "max_tokens": 0, "echo": True, "logprobs": 0,
                "temperature": 0.0, "merge": recipe.to_dict()}
        backend = ApiBackend(url, api_key="bench", concurrency=1)
        raw = httpx.Client(base_url=url, headers={"Authorization": "Bearer bench"})
        for _ in range(20):  # warm both
            backend.evaluate(recipe, example)
            raw.post("/completions", json=body).json()
        per_backend, per_raw = [], []
        for _ in range(n):  # interleaved, so load changes hit both alike
            t = time.perf_counter()
            raw.post("/completions", json=body).json()
            per_raw.append(time.perf_counter() - t)
            t = time.perf_counter()
            score = backend.evaluate(recipe, example)
            per_backend.append(time.perf_counter() - t)
            assert score.ok and score.cost.queries == 1
        backend.close()
    finally:
        proc.terminate()
    med_b, med_r = statistics.median(per_backend), statistics.median(per_raw)
    return {"queries": n, "backend_ms_median": round(med_b * 1e3, 3), "raw_httpx_ms_median": round(med_r * 1e3, 3),
            "overhead_ms_median": round((med_b - med_r) * 1e3, 3), "ratio_backend_over_raw": round(med_b / med_r, 2)}


def in_flight(concurrency: int, delay: float) -> dict:
    proc, url = endpoint(delay)
    try:
        examples = [Example("Q:", " A", id=str(i)) for i in range(4 * concurrency)]
        backend = ApiBackend(url, api_key="bench", concurrency=concurrency, batch_size=1)
        start = time.perf_counter()
        score = backend.evaluate(MergeRecipe("evo", ("base",), (1.0,)), examples)
        wall = time.perf_counter() - start
        server_peak = httpx.get(url + "/stats").json()["peak"]
        backend.close()
    finally:
        proc.terminate()
    return {"concurrency": concurrency, "queries": score.cost.queries, "delay_s": delay, "wall_s": round(wall, 3),
            "ideal_wall_s": round(4 * delay, 3), "client_peak_in_flight": backend.max_in_flight,
            "server_peak_in_flight": server_peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    args = ap.parse_args()
    if args.serve:
        from evomerge.serve.embedded import bind, uvicorn_server

        uvicorn_server(trivial_app(args.delay)).run(sockets=[bind("127.0.0.1", args.serve)])
        return
    print(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
                      "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
                      "overhead": overhead(args.queries),
                      "in_flight": [in_flight(c, args.delay) for c in args.concurrency]}, indent=2))


if __name__ == "__main__":
    main()
