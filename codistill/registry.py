"""One registry shape for models, methods and data sets (timm's `register_model`, once).

A name maps to an entry; registering a name twice is an error (two entries silently
shadowing each other is how a typo'd import hides), and looking up an unknown name is a
`ConfigError` that lists what is registered."""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from codistill.errors import ConfigError

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, entry: Entry) -> Entry:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str, key: str = "") -> Entry:
        """The entry of `name`; an unknown name is a ConfigError at `key` listing the names."""
        if name not in self._entries:
            raise ConfigError(key, f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def __getitem__(self, name: str) -> Entry:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return self._entries.items()

    def names(self) -> list[str]:
        return sorted(self._entries)
