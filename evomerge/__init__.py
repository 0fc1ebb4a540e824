"""evomerge: black-box evolutionary merging of model experts, by evaluation only.

`import evomerge` stays light; torch, ray, nevergrad, openai and matplotlib load where a feature
needs them.
"""

from evomerge.errors import EvomergeError
from evomerge.recipe import MergeRecipe
from evomerge.score import Cost, Score

__version__ = "0.1.0"
__all__ = ["EvomergeError", "MergeRecipe", "Score", "Cost", "search", "__version__"]


def __getattr__(name: str):
    if name == "search":
        from evomerge.api import search

        return search
    raise AttributeError(f"module 'evomerge' has no attribute {name!r}")
