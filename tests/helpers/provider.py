"""A real provider on 127.0.0.1 over the BPE provider repository (`bpe.build_tiny_repository`,
built once per session), its fixtures, and the local-vs-api comparison the parity tests share.

Fixtures reach a test folder through its conftest.py (serve, faults) or an import (test_api.py).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from evomerge.serve.protocol import Limits

API_KEY = "sk-test-" + secrets.token_hex(8)


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.getbasetemp() / "tiny_repo"
    if not (root / "experts" / "french" / "adapter_config.json").is_file():
        from tests.helpers.bpe import build_tiny_repository

        build_tiny_repository(root)
    return root


@pytest.fixture(scope="session")
def host(tiny_repo: Path) -> Any:
    """One host (the model in memory) for direct, server-free reference computations."""
    from evomerge.serve.embedded import load_host

    return load_host(tiny_repo)


def start_server(repo: Path, api_key: str | None = API_KEY, limits: Limits = Limits()) -> Any:
    from evomerge.serve.app import create_app
    from evomerge.serve.embedded import ServerThread, load_host

    thread = ServerThread(create_app(load_host(repo), api_key=api_key, limits=limits))
    thread.start()
    return thread


@pytest.fixture(scope="session")
def server(tiny_repo: Path) -> Iterator[Any]:
    """A real provider with auth on (API_KEY); `server.base_url` ends in /v1."""
    thread = start_server(tiny_repo)
    yield thread
    thread.stop()


@pytest.fixture()
def fresh_server(tiny_repo: Path) -> Iterator[Any]:
    """A provider of its own, so a test can count its merges from zero."""
    thread = start_server(tiny_repo)
    yield thread
    thread.stop()


def stats(server: Any) -> dict[str, Any]:
    return httpx.get(server.base_url + "/stats", headers={"Authorization": f"Bearer {API_KEY}"}).json()


def local_and_api(repo: Path, url: str, objective: Any, examples: list[Any], recipe: Any, **options: Any) -> tuple[Any, Any]:
    """The local and the api score of `recipe` on `examples` (fresh backends, so no memo is shared;
    `options` go to both), after checking neither failed."""
    from evomerge.backends.remote import ApiBackend
    from evomerge.backends.local import LocalBackend

    local = LocalBackend(repo, objective, device="cpu", **options)
    api = ApiBackend(url, api_key=API_KEY, objective=objective, batch_size=4, backoff=0.01, **options)
    try:
        a, b = local.evaluate(recipe, examples), api.evaluate(recipe, examples)
    finally:
        local.close()
        api.close()
    assert a.ok and b.ok, (a.error, b.error)
    return a, b
