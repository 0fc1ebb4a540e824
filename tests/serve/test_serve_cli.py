"""`evomerge serve` as a real process: it starts, answers with auth, and refuses a missing key."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

from tests.helpers.provider import API_KEY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_with_auth_from_the_environment(tiny_repo) -> None:
    port = free_port()
    env = {**os.environ, "EVOMERGE_SERVE_KEY": API_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "evomerge", "serve", "--repository", str(tiny_repo),
                             "--port", str(port), "--api-key-env", "EVOMERGE_SERVE_KEY"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1/models"
        deadline = time.monotonic() + 90
        while True:
            try:
                r = httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"})
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert [m["id"] for m in r.json()["data"]] == ["base", "colour", "french", "math"]
        assert httpx.get(url).status_code == 401
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert API_KEY not in out


def test_serve_refuses_an_unset_key_variable(tiny_repo) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EVOMERGE_UNSET_KEY"}
    r = subprocess.run([sys.executable, "-m", "evomerge", "serve", "--repository", str(tiny_repo),
                        "--api-key-env", "EVOMERGE_UNSET_KEY"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "EVOMERGE_UNSET_KEY" in r.stderr


def test_the_embedded_server_starts_on_a_free_port_and_stops(tiny_repo) -> None:
    from evomerge.serve import serving

    with serving(tiny_repo) as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        assert httpx.get(base_url + "/models").json()["data"][0]["id"] == "base"  # no key: auth off
    try:
        httpx.get(base_url + "/models", timeout=2)
        raise AssertionError("the embedded server still answers after the block")
    except httpx.ConnectError:
        pass
