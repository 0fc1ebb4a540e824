"""Fitness functions for tests that run searches in a subprocess (importable by path)."""

from __future__ import annotations

import os
import time

from evomerge.demo import demo_fitness
from evomerge.recipe import MergeRecipe


def slow_demo(recipe: MergeRecipe) -> dict[str, float]:
    """The demo fitness, slowed so a test can kill the process mid-run."""
    time.sleep(float(os.environ.get("EVOMERGE_TEST_DELAY", "0.01")))
    return demo_fitness(recipe)
