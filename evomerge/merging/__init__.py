"""Merging experts into a base model: methods, the streaming merger and the in-place engine.

Importing this package loads torch; `import evomerge` does not.
"""

from evomerge.merging.engine import MergeEngine
from evomerge.merging.merger import Merger
from evomerge.merging.methods import METHODS

__all__ = ["MergeEngine", "Merger", "METHODS"]
