"""`evomerge serve`: run the reference provider over a repository until interrupted.

`evomerge/cli.py` calls `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.serve.protocol import Limits


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve` command (its handler is ``args.func``)."""
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible merge provider over a repository",
                              description="Serve /v1/models, /v1/completions, /v1/chat/completions and the "
                                          "merge-session API; each request may carry a `merge` recipe.")
    p.add_argument("--repository", type=Path, help="repository directory (default: the tiny demo zoo)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", metavar="VAR",
                   help="require 'Authorization: Bearer <key>' with the key read from environment variable VAR")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    p.add_argument("--max-batch", type=int, default=Limits.max_batch, help="prompts per request")
    p.add_argument("--max-prompt-tokens", type=int, metavar="N",
                   help="longest prompt served, in tokens; longer ones get 400 at once (default: the model's "
                        "context length; GET /v1/models states it)")
    p.add_argument("--tokens-per-minute", type=int, metavar="N",
                   help="tokens (prompts and generations) one API key may use per minute; beyond, 429 with "
                        "Retry-After (default: no limit)")
    p.add_argument("--deadline", type=float, default=Limits.deadline, metavar="SECONDS",
                   help="a request unanswered after this long gets 504 and its queued work is dropped")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (1 is fastest for small models "
                                                       "on a busy CPU)")
    p.add_argument("--cache-size", type=int, default=256, help="merged states kept (LRU by recipe key)")
    p.add_argument("--no-cross-recipe", dest="cross_recipe", action="store_false",
                   help="score each recipe in its own forward, merged, instead of letting waiting requests of "
                        "distinct low-rank recipes share one (for comparison and debugging)")
    p.add_argument("--registry", type=Path, metavar="FILE",
                   help="where merges registered as models are kept (default: REPOSITORY/registered_models.json)")
    p.set_defaults(func=serve)
    return p


def serve(args: argparse.Namespace) -> int:
    from evomerge._imports import require
    from evomerge.serve.app import create_app
    from evomerge.serve.embedded import bind, load_host, uvicorn_server
    from evomerge.serve.registry import ModelRegistry

    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset; "
                              "export the key there first")
    repository = args.repository
    if repository is None:
        from evomerge.zoo import ensure_tiny

        repository = ensure_tiny()
    if args.torch_threads:
        require("torch", "evomerge serve").set_num_threads(args.torch_threads)
    sock = bind(args.host, args.port)  # fail fast on a taken port, before loading the model
    for flag, value in (("--max-prompt-tokens", args.max_prompt_tokens),
                        ("--tokens-per-minute", args.tokens_per_minute), ("--deadline", args.deadline)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} is {value}; give a positive number")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_batch=args.max_batch,
                    max_prompt_tokens=args.max_prompt_tokens, tokens_per_minute=args.tokens_per_minute,
                    deadline=args.deadline)
    registry = ModelRegistry(args.registry or Path(repository) / "registered_models.json")
    app = create_app(load_host(repository, args.device, args.dtype), api_key=key, limits=limits,
                     cache_size=args.cache_size, registry=registry, cross_recipe=args.cross_recipe)
    print(f"evomerge serve: {repository} on http://{args.host}:{args.port}/v1"
          f" (auth {'on' if key else 'off'})", flush=True)
    uvicorn_server(app).run(sockets=[sock])
    return 0
