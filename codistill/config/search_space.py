"""The search-space grammar of `tune.space`: `loguniform(1, 10)`, `choice([a, b])`, … as text
in the config, parsed and checked here without Ray (`codistill.experiments.tune` turns them into Ray Tune
domains)."""

from __future__ import annotations

import yaml

from codistill.config.strict_yaml import load_yaml
from codistill.errors import ConfigError


DISTRIBUTIONS = {
    # name: (number of arguments, what they are)
    "uniform": (2, "low, high"),
    "loguniform": (2, "low, high (both > 0)"),
    "quniform": (3, "low, high, q"),
    "randint": (2, "low, high (high exclusive)"),
    "choice": (1, "[a, b, ...]"),
    "grid": (1, "[a, b, ...] (every value is tried)"),
}


def parse_distribution(text: str, key: str) -> tuple[str, list]:
    """`loguniform(1, 10)` → ("loguniform", [1, 10]); errors name `key` and the forms allowed."""
    allowed = "; ".join(f"{n}({a})" for n, (_, a) in DISTRIBUTIONS.items())
    text = str(text).strip()
    name, _, rest = text.partition("(")
    if name not in DISTRIBUTIONS or not rest.endswith(")"):
        raise ConfigError(key, f"malformed distribution {text!r}; allowed: {allowed}")
    try:
        args = load_yaml(f"[{rest[:-1]}]")
    except yaml.YAMLError:
        raise ConfigError(key, f"cannot read the arguments of {text!r}; allowed: {allowed}") from None
    count, what = DISTRIBUTIONS[name]
    if len(args) != count:
        raise ConfigError(key, f"{name} takes {what}, got {text!r}")
    if name in ("choice", "grid"):
        if not isinstance(args[0], list) or not args[0]:
            raise ConfigError(key, f"{name} takes a non-empty list, got {text!r}")
    else:
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(key, f"{name} takes numbers, got {text!r}")
        if args[0] >= args[1]:
            raise ConfigError(key, f"low must be below high in {text!r}")
        if name == "loguniform" and args[0] <= 0:
            raise ConfigError(key, f"loguniform needs low > 0, got {text!r}")
    return name, args


def distribution_values(name: str, args: list) -> list:
    """Values that stand for a distribution when checking that its key accepts them."""
    if name in ("choice", "grid"):
        return list(args[0])
    if name == "randint":
        return [int(args[0]), int(args[1]) - 1]
    return [args[0], args[1]]
