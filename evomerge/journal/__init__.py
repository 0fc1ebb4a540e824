"""The journal: SQLite record of every evaluation and spend reservation (resume, cache, report)."""

from evomerge.journal.records import Trial
from evomerge.journal.sqlite import Journal

__all__ = ["Journal", "Trial"]
