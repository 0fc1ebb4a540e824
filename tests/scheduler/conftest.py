"""One real Ray for the whole test session (starting it takes seconds), shared by the Ray tests."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

SESSION_CPUS = 8
"""Logical CPUs of the test Ray: enough that two small executors' actors fit side by side."""
SESSION_GPUS = 8
"""Logical GPUs (Ray schedules GPUs as a resource; none need exist), so actors are placed as on
a GPU cluster: one GPU each unless the factory says it needs none."""


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    ray = pytest.importorskip("ray")
    from evomerge.scheduler.ray_executor import worker_pythonpath

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # A short path: Ray's unix sockets live under it and must stay under 108 characters.
    temp_dir = tempfile.mkdtemp(prefix="evr-", dir="/tmp")
    if not ray.is_initialized():
        # Workers import evomerge and the test factories (`tests.helpers.ray_fitness`) from this checkout.
        with worker_pythonpath(str(Path(__file__).resolve().parents[2])):
            ray.init(num_cpus=SESSION_CPUS, num_gpus=SESSION_GPUS, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    yield ray
    ray.shutdown()
