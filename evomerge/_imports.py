"""Lazy imports for heavy packages, so `import evomerge` stays light.

torch, ray, nevergrad, openai and matplotlib load only where a feature needs them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from evomerge.errors import MissingDependency


def require(module: str, feature: str, package: str | None = None) -> ModuleType:
    """Import `module` or raise a one-line error naming the feature and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"{feature} needs the '{package or module}' package ({exc}); "
            f"install it with: pip install {package or module}"
        ) from exc
