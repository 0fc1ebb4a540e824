"""The built-in synthetic demo: a fitness with a known optimum in the Evo-Merging space.

Eight experts, three of which help (their ideal scale is positive), one that hurts (ideal scale
negative) and four that are noise (ideal zero); keep ratios matter only for the helpful ones.
It runs in microseconds, so `evomerge search --backend python` shows the whole machinery
(optimizer, journal, resume, report) on any machine.
"""

from __future__ import annotations

import numpy as np

from evomerge.recipe import MergeRecipe

EXPERTS = tuple(f"expert_{i}" for i in range(8))
BETA_STAR = np.array([0.9, 0.6, 0.4, -0.5, 0.0, 0.0, 0.0, 0.0])
ALPHA_STAR = np.array([0.3, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0])


def demo_fitness(recipe: MergeRecipe) -> dict[str, float]:
    """A smooth loss with minimum 0.1 at (ALPHA_STAR, BETA_STAR); unknown experts count as noise."""
    index = {name: i for i, name in enumerate(EXPERTS)}
    beta = np.zeros(len(EXPERTS))
    alpha = np.ones(len(EXPERTS))
    for j, name in enumerate(recipe.experts):
        i = index.get(name)
        if i is not None:
            beta[i] = recipe.weights[j]
            if recipe.densities is not None:
                alpha[i] = recipe.densities[j]
    helpful = np.abs(BETA_STAR) > 0
    loss = 0.1 + float(np.sum((beta - BETA_STAR) ** 2) + 0.5 * np.sum(((alpha - ALPHA_STAR) * helpful) ** 2))
    return {"loss": loss, "accuracy": float(np.exp(-loss))}
