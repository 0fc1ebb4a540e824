"""Backends: where candidates are scored. Each registers its evaluator factory in `BACKENDS` under
the name users type (`backend: local`), and builds it from a run's config (`from_config`)."""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING

from evomerge.backends import local, python, remote  # noqa: F401  (each registers its factory)
from evomerge.backends._base import BACKENDS, EvaluatorFactory, Prepared, Weights

if TYPE_CHECKING:
    from evomerge.config import SearchConfig

__all__ = ["BACKENDS", "EvaluatorFactory", "Prepared", "Weights", "prepare"]


def prepare(config: SearchConfig, stack: ExitStack, resume: bool = False) -> Prepared:
    """The configured backend's experts and evaluator factory; what must outlive the search (the
    embedded provider) is entered on `stack`."""
    return BACKENDS[config.backend].from_config(config, stack, resume)
