"""One tiny zoo per test session, built into a temporary folder (about two CPU minutes)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    pytest.importorskip("peft")
    from evomerge.zoo import build

    return build("tiny", tmp_path_factory.mktemp("zoo") / "tiny", seed=0, progress=False)
