"""One error family, so callers catch `EvomergeError` and the CLI prints one line and exits 2.

Each leaf is also the matching builtin, so code that expects a `ValueError` or `OSError` still
catches it. Messages say what is wrong and how to fix it.
"""

from __future__ import annotations


class EvomergeError(Exception):
    """Base of every error evomerge raises on purpose."""


class ConfigError(EvomergeError, ValueError):
    """A config file, flag or argument is invalid."""


class RecipeError(EvomergeError, ValueError):
    """A merge recipe is malformed (unknown method, wrong lengths, non-finite values)."""


class SearchSpaceError(EvomergeError, ValueError):
    """A vector does not fit a search space (wrong size, outside the bounds)."""


class RepositoryError(EvomergeError, ValueError):
    """A base model or expert is missing, unreadable or incompatible."""


class TaskError(EvomergeError, ValueError):
    """A task file is malformed or a split is empty."""


class JournalError(EvomergeError, ValueError):
    """A journal is corrupt, foreign, or belongs to a different configuration."""


class BackendError(EvomergeError, RuntimeError):
    """A backend cannot start (unreachable provider, wrong key, missing capability)."""


class BudgetExhausted(EvomergeError, RuntimeError):
    """A query or token cap would be exceeded; no further work may be paid for."""


class MissingDependency(EvomergeError, ImportError):
    """An optional package a feature needs is not installed."""
