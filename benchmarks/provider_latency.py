"""A short request's latency while 8 clients keep the provider busy with long (allowed) prompts.

    PYTHONPATH=. python -m benchmarks.provider_latency [--max-prompt-tokens N] [--seconds S]

Serves the tiny demo zoo on loopback (`evomerge.serve`), starts 8 client threads that each send
echo + logprobs requests of 4 prompts at the prompt limit, back to back, and sends one short
request every 0.25 s; prints the short requests' latencies and what the long clients got.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx

from evomerge.serve.app import create_app
from evomerge.serve.embedded import ServerThread, load_host
from evomerge.serve.protocol import Limits
from evomerge.zoo import ensure_tiny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-prompt-tokens", type=int, help="the provider's limit (default: the model's context)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    host = load_host(ensure_tiny())
    app = create_app(host, limits=Limits(max_prompt_tokens=args.max_prompt_tokens))
    limit = args.max_prompt_tokens or host.context_length
    long_prompt = "word " * (limit // 5)  # one byte-level token per character: just under the limit
    with ServerThread(app) as url:
        stop = time.monotonic() + args.seconds
        long_times: list[float] = []
        statuses: dict[int, int] = {}

        def busy() -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                while time.monotonic() < stop:
                    t = time.perf_counter()
                    r = c.post("/completions", json={"prompt": [long_prompt] * 4, "max_tokens": 0, "echo": True,
                                                     "logprobs": 0})
                    long_times.append(time.perf_counter() - t)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        threads = [threading.Thread(target=busy, daemon=True) for _ in range(args.clients)]
        for th in threads:
            th.start()
        time.sleep(1.0)  # the long clients are in full swing
        short: list[float] = []
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = c.post("/completions", json={"prompt": "Word: sky\nFirst letter:", "max_tokens": 0,
                                                 "echo": True, "logprobs": 0})
                short.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
                time.sleep(0.25)
        for th in threads:
            th.join()
    print(f"prompt limit {limit} tokens; {args.clients} clients x 4 prompts of {len(long_prompt)} characters")
    print(f"long requests: {len(long_times)} answered {statuses}, median {statistics.median(long_times):.3f} s, "
          f"max {max(long_times):.3f} s")
    print(f"short requests: {len(short)}, median {statistics.median(short) * 1000:.0f} ms, "
          f"p90 {sorted(short)[int(0.9 * len(short))] * 1000:.0f} ms, max {max(short) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
