"""`evomerge zoo serve-gguf`: llama.cpp's own server over an exported zoo, for searches through it.

Why: a third-party provider to search through with nothing installed but a wheel: `xllamacpp`
(``pip install ".[llamacpp]"``) is llama.cpp's native C++ server, prebuilt for the CPU. Every
expert of `evomerge.zoo.gguf_export`'s layout is loaded at scale 0 (``--lora-init-without-apply``),
so a request's ``lora`` field alone decides the merge. Any other llama.cpp server started with
``--lora-init-without-apply --lora A.gguf --lora B.gguf ...`` serves the same.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from evomerge._imports import require
from evomerge.errors import ConfigError
from evomerge.zoo.gguf_export import BASE_FILE, EXPERTS_DIR


def server_params(gguf_dir: str | Path, port: int, threads: int = 1, parallel: int = 2, ctx: int = 4096) -> Any:
    """llama.cpp's parameters for `gguf_dir` (base.gguf + experts/*.gguf) on 127.0.0.1:`port`:
    `parallel` slots sharing a `ctx`-token context, `threads` CPU threads, /metrics on."""
    xllamacpp = require("xllamacpp", "llama.cpp's server (pip install \".[llamacpp]\")")
    root = Path(gguf_dir)
    base, experts = root / BASE_FILE, sorted((root / EXPERTS_DIR).glob("*.gguf"))
    if not base.is_file():
        raise ConfigError(f"{root} has no {BASE_FILE}; write it with `evomerge zoo export-gguf ZOO {root}`")
    params = xllamacpp.CommonParams()
    params.model.path = str(base)
    params.port = port
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    params.n_parallel, params.n_ctx = parallel, ctx
    params.endpoint_metrics = True
    adapters = []
    for path in experts:
        adapter = xllamacpp.CommonAdapterLoraInfo()
        adapter.path, adapter.scale = str(path), 0.0
        adapters.append(adapter)
    params.lora_adapters = adapters
    params.lora_init_without_apply = True
    return params


def serve_forever(gguf_dir: str | Path, port: int, **options: Any) -> None:
    """Start the server and block (it stops with the process)."""
    xllamacpp = require("xllamacpp", "llama.cpp's server (pip install \".[llamacpp]\")")
    server = xllamacpp.Server(server_params(gguf_dir, port, **options))
    print(f"llama.cpp serving {gguf_dir} at {server.listening_address}/v1", flush=True)
    while True:
        time.sleep(3600)
