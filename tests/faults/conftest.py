"""Fixtures of the fault suite: the tiny provider repository, a real provider, one Ray per session."""

from tests.scheduler.conftest import ray_session  # noqa: F401  (pytest fixture)
from tests.helpers.provider import host, server, tiny_repo  # noqa: F401  (pytest fixtures)
