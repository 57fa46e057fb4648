"""The one error a user's mistake becomes: `ConfigError(path, message)`, and `check` to raise it.

Every layer raises it (config schema, registries, methods checking their peers, the engine
checking storage), so it lives below all of them and imports nothing of codistill."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is wrong. `path` is the dotted key path (e.g. `peers.1.model`)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)

    def __reduce__(self):  # so the error survives pickling across Ray processes
        return ConfigError, (self.path, self.message)

    def under(self, prefix: str) -> "ConfigError":
        return ConfigError(f"{prefix}.{self.path}" if self.path else prefix, self.message)


def first_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one line for a one-line error: its message's first line, or its type's
    name when it has no message."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless `condition` holds."""
    if not condition:
        raise ConfigError(key, message)


class RunError(RuntimeError):
    """A run cannot go on, through no mistake in its config: it diverged, another process
    writes the same run, its records do not add up. The CLI prints it as one line (exit 1)."""

    def __reduce__(self):  # survives pickling across Ray processes as the same type
        return type(self), self.args
