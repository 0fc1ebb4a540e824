"""llama.cpp's real server (xllamacpp) in a child process over an export-gguf folder, so a test can
kill it (-9) and start it again on the same port. Tests that use it skip when xllamacpp is absent."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

NEEDS_XLLAMACPP = "xllamacpp (llama.cpp's server, pip install '.[llamacpp]') is not installed"


def require_xllamacpp() -> None:
    pytest.importorskip("xllamacpp", reason=NEEDS_XLLAMACPP)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`evomerge zoo serve-gguf DIR` on 127.0.0.1; `url` is its /v1 root, `root` the server's own."""

    def __init__(self, gguf_dir: Path, log: Path, parallel: int = 2) -> None:
        self.gguf_dir, self.log, self.parallel = gguf_dir, log, parallel
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "LlamaServer":
        cmd = [sys.executable, "-m", "evomerge", "zoo", "serve-gguf", str(self.gguf_dir), "--port", str(self.port),
               "--parallel", str(self.parallel)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama.cpp's server exited ({self.process.returncode}); see {self.log}")
            try:
                if httpx.get(self.root + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"llama.cpp's server did not answer /health in {timeout} s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL, as a crash: no request in flight is answered."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def metrics(self) -> dict[str, float]:
        """llama.cpp's Prometheus counters (llamacpp:NAME -> value)."""
        out = {}
        for line in httpx.get(self.root + "/metrics", timeout=10).text.splitlines():
            if line.startswith("llamacpp:"):
                name, value = line.split()
                out[name.removeprefix("llamacpp:")] = float(value)
        return out

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


@pytest.fixture(scope="session")
def tiny_gguf(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny zoo exported by `evomerge zoo export-gguf` (seconds)."""
    require_xllamacpp()
    from evomerge.zoo.gguf_export import export_gguf

    out = tmp_path_factory.mktemp("tiny-gguf")
    export_gguf(tiny_zoo, out)
    return out
