"""Merging experts into a base model: kernels, the streaming merger and the in-place engine.

Importing this package loads torch; `import evomerge` does not (what each method is, without its
tensors, is `evomerge.recipe.METHODS`).
"""

from evomerge.merging.engine import MergeEngine
from evomerge.merging.merger import Merger
from evomerge.merging.methods import KERNELS

__all__ = ["MergeEngine", "Merger", "KERNELS"]
