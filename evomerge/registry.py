"""`Registry`: one name → implementation table per family (merge methods, optimizers, spaces, backends).

Keys are what users type in YAML (nevergrad's ``registry["CMA"]``, mergekit's ``@merge_method``).
Registering a name or alias that is already taken raises, so one module can never silently shadow
another's entry; looking up an unknown name raises the family's one-line error naming the choices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from evomerge.errors import ConfigError, EvomergeError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one family, in registration order; aliases resolve to their entry."""

    def __init__(self, family: str, *, error: type[EvomergeError] = ConfigError, fold_case: bool = False,
                 also: str | None = None) -> None:
        """`family` names the entries in messages ("optimizer"); `error` is what bad names raise;
        `fold_case` makes names case-insensitive; `also` says what else a caller accepts beyond the
        keys (named after them in the unknown-name message)."""
        self.family = family
        self._error = error
        self._fold_case = fold_case
        self._also = also
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def _key(self, name: str) -> str:
        return name.lower() if self._fold_case else name

    def add(self, name: str, entry: T, *, aliases: Sequence[str] = ()) -> T:
        """Register `entry` under `name` and `aliases`; raises if any of them is taken."""
        keys = [self._key(n) for n in (name, *aliases)]
        taken = next((k for i, k in enumerate(keys) if k in self or k in keys[:i]), None)
        if taken is not None:
            raise self._error(f"{self.family} name {taken!r} is registered twice; give it another name")
        self._entries[keys[0]] = entry
        self._aliases.update(dict.fromkeys(keys[1:], keys[0]))
        return entry

    def register(self, name: str, *, aliases: Sequence[str] = ()) -> Callable[[T], T]:
        """Decorator form of `add`."""

        def deco(entry: T) -> T:
            return self.add(name, entry, aliases=aliases)

        return deco

    def __getitem__(self, name: str) -> T:
        if name not in self:
            choices = ", ".join(sorted(self._entries)) + (f" or {self._also}" if self._also else "")
            raise self._error(f"unknown {self.family} {name!r}; choose one of {choices}")
        key = self._key(name)
        return self._entries[self._aliases.get(key, key)]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = self._key(name)
        return key in self._entries or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        """The registered names (not the aliases), in registration order."""
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list[T]:
        return list(self._entries.values())
