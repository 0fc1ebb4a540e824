"""What the backends' `from_config` share: the repository, the experts, the splits' digest and the
generation length a run's config asks for."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError
from evomerge.tasks import Splits

if TYPE_CHECKING:
    from evomerge.config import SearchConfig


def repository_dir(config: SearchConfig) -> Path:
    """The configured repository, or the tiny demo zoo (built on first use)."""
    if config.repository is None:
        from evomerge.zoo import ensure_tiny

        return Path(ensure_tiny())
    return Path(config.repository)


def splits_digest(splits: Splits) -> str:
    """A short hash of every example of every split (ids, prompts, answers, tasks)."""
    text = repr([[(e.id, e.task, e.prompt, e.answer) for e in part]
                 for part in (splits.fit, splits.validation, splits.test)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def select_experts(wanted: Sequence[str] | None, available: Sequence[str]) -> tuple[str, ...]:
    """The configured experts (default: all of them, sorted), each checked against what is offered."""
    experts = tuple(wanted or sorted(available))
    unknown = [e for e in experts if e not in available]
    if unknown:
        raise ConfigError(f"unknown expert(s) {unknown}; the repository has {', '.join(sorted(available)[:10])}"
                          + (" ..." if len(available) > 10 else ""))
    return experts


def generation_tokens(config: SearchConfig, splits: Splits, limit: int | None = None) -> int:
    """New tokens generation may take, alike on every split: task.max_new_tokens, else the longest
    answer's `generation_length` over fit, validation and test. Past a provider's `limit`, a run
    that generates is refused here in one line, not by every request."""
    from evomerge.objectives import Objective
    from evomerge.tasks import generation_length

    length = config.task.max_new_tokens or generation_length(splits.fit + splits.validation + splits.test)
    tested = Objective(dict.fromkeys(config.test_metrics, 1.0))
    generates = Objective.from_config(config.objective).needs_generation or tested.needs_generation
    if limit is not None and length > limit and generates:
        raise ConfigError(f"generation needs {length} new tokens (task.max_new_tokens, or the longest answer), "
                          f"beyond the provider's max_tokens limit of {limit}; set task.max_new_tokens to at most "
                          f"{limit} or shorten the answers")
    return length
