"""Picklable evaluator factories for the Ray tests and benchmarks: real work, faults on purpose.

A factory is built in the driver, pickled to a Ray actor and called there once; the evaluator
it returns scores many recipes. Deterministic loss: the sum of squares of the recipe's weights.
Tests steer one evaluation through ``recipe.meta`` (``sleep`` seconds, ``crash`` to exit the
worker process, ``announce`` a folder where the worker writes its pid before working).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import ray

from evomerge.recipe import MergeRecipe
from evomerge.score import Cost, Score


def squares(recipe: MergeRecipe) -> float:
    return float(sum(w * w for w in recipe.weights))


def squares_where(recipe: MergeRecipe) -> dict[str, float]:
    """A python-backend fitness that also says which worker process evaluated it (slow enough
    that a worker starting late still gets work)."""
    time.sleep(0.4)
    return {"loss": squares(recipe), "pid": float(os.getpid())}


class ProbeFactory:
    """Builds a `Probe`; with `crash_once` (a file path), the first evaluation anywhere exits
    its worker process mid-candidate (the path is claimed atomically, so exactly once).
    `uses_gpu` is the executor's hint whether a worker needs a GPU."""

    def __init__(self, crash_once: str | None = None, sleep: float = 0.0, uses_gpu: bool = True) -> None:
        self.crash_once = crash_once
        self.sleep = sleep
        self.uses_gpu = uses_gpu

    def __call__(self) -> "Probe":
        return Probe(self.crash_once, self.sleep)


class Probe:
    """Scores Σw², records when and where it ran (metrics: start, end, pid, calls, and gpu:
    the Ray GPU id the worker holds, -1 for none)."""

    def __init__(self, crash_once: str | None, sleep: float) -> None:
        self.crash_once = crash_once
        self.sleep = sleep
        self.calls = 0

    def __call__(self, recipe: MergeRecipe, split: str) -> Score:
        start = time.time()
        self.calls += 1
        meta = recipe.meta
        if "announce" in meta:
            Path(meta["announce"], str(os.getpid())).write_text(split)
        if meta.get("crash") or (self.crash_once and _claim(self.crash_once)):
            time.sleep(0.05)
            os._exit(1)
        time.sleep(float(meta.get("sleep", self.sleep)))
        end = time.time()
        gpus = ray.get_gpu_ids()
        return Score(loss=squares(recipe), cost=Cost(queries=1, seconds=end - start),
                     metrics={"start": start, "end": end, "pid": float(os.getpid()), "calls": float(self.calls),
                              "gpu": float(gpus[0]) if gpus else -1.0})


def _claim(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class BrokenFactory:
    """A factory whose build fails, as a missing model file would."""

    def __call__(self) -> "Probe":
        raise FileNotFoundError("no model at /nonexistent/model.safetensors")


class HttpFactory:
    """Builds an evaluator that asks a real HTTP endpoint for the loss (an I/O-bound fitness)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self) -> "HttpEvaluator":
        return HttpEvaluator(self.url)


class HttpEvaluator:
    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self, recipe: MergeRecipe, split: str) -> Score:
        start = time.time()
        delay = float(recipe.meta.get("delay", -1.0))
        query = f"?w={','.join(repr(w) for w in recipe.weights)}&delay={delay}"
        with urllib.request.urlopen(self.url + query, timeout=60) as response:
            loss = json.loads(response.read())["loss"]
        end = time.time()
        return Score(loss=loss, cost=Cost(queries=1, seconds=end - start), metrics={"start": start, "end": end})


class DelayServer:
    """A loopback HTTP endpoint that answers Σw² after a delay: the request's, else `delay`, or
    with `spread` = (low, high) a delay drawn uniformly per recipe (the same recipe, the same delay)."""

    def __init__(self, delay: float, spread: tuple[float, float] | None = None) -> None:
        def default(weights: str) -> float:
            return random.Random(weights).uniform(*spread) if spread else delay

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlparse(self.path).query)
                wait = float(query.get("delay", ["-1"])[0])
                time.sleep(wait if wait >= 0 else default(query["w"][0]))
                weights = [float(w) for w in query["w"][0].split(",")]
                body = json.dumps({"loss": sum(w * w for w in weights)}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "DelayServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
