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
        self._origins: dict[str, str] = {}
        self._from_user: set[str] = set()

    def add(self, name: str, entry: Entry, origin: str = "") -> Entry:
        """Register `entry`; `origin` is the module of the code behind it (codistill's own
        entries come from `codistill.…`; everything else is the user's, shipped with a run)."""
        if name in self._entries:
            before = self._origins.get(name) or "an earlier registration"
            raise ConfigError("", f"{self.kind} {name!r} is registered twice: by {before} and by "
                                  f"{origin or 'another registration'} (a module imported under two names, or a name "
                                  "taken already); choose another name")
        self._entries[name] = entry
        self._origins[name] = origin
        if origin and not (origin == "codistill" or origin.startswith("codistill.")):
            self._from_user.add(name)
        return entry

    def user_entries(self) -> dict[str, Entry]:
        """What user code registered (in a script's __main__, a module beside it, a package):
        the runners ship these to every worker, which imports codistill afresh."""
        return {name: self._entries[name] for name in sorted(self._from_user)}

    def adopt(self, entries: dict[str, Entry]) -> None:
        """Register entries shipped from the driver, unless this process has them already."""
        for name, entry in entries.items():
            if name not in self._entries:
                self._entries[name] = entry
                self._from_user.add(name)

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
