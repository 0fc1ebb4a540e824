"""Suite-wide set-up: one cache folder per test session, so the tiny zoo is built once and shared
(the zoo tests, the local backend and the embedded-demo CLI test all use it), and no test reads
or writes the user's own cache. Set EVOMERGE_CACHE beforehand to reuse a built zoo across runs."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("EVOMERGE_CACHE", tempfile.mkdtemp(prefix="evomerge-test-cache-"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_zoo():
    """The tiny demo zoo (built on first use, about two CPU minutes)."""
    pytest.importorskip("peft")
    from evomerge.zoo import ensure_tiny

    return ensure_tiny()
