"""Plain data → the schema's dataclasses, with the key path in every error; `--set`
overrides; `load_config`, the one way a config is read."""

from __future__ import annotations

import copy
import importlib
import dataclasses
import math
import os
import re
import stat
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from codistill.config.schema import ExperimentConfig, TuneSettings
from codistill.config.search_space import distribution_values, parse_distribution
from codistill.config.strict_yaml import load_yaml
from codistill.errors import ConfigError, first_line

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _build_value(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _build_value(non_none[0], value, path)
        sections = [a for a in non_none if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:  # a mapping meant for the section: its errors name the key
            return _build_value(sections[0], value, path)
        problems = []  # e.g. a name or a mapping (data.tokenizer: bpe | {path: DIR}): the first that takes it
        for alternative in non_none:
            try:
                return _build_value(alternative, value, path)
            except ConfigError as err:
                problems.append(err.message)
        raise ConfigError(path, "; or ".join(problems))
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"got {value!r}; allowed: {', '.join(repr(a) for a in args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        item_type = args[0]
        return tuple(_build_value(item_type, v, f"{path}.{i}") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        key_type, value_type = args
        return {_build_value(key_type, k, path): _build_value(value_type, v, f"{path}.{k}")
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        if not math.isfinite(value):  # `> 0` holds for infinity: no range check would catch it
            raise ConfigError(path, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    raise ConfigError(path, f"unsupported type {tp}")


def build_dataclass(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types name their path.

    A base class may choose the dataclass to build from the data itself: when `cls` has a
    `choose_class(data, path)` classmethod (e.g. `MethodConfig`, by the registered `name`),
    the class it returns is built, and an unknown key says whose settings were expected."""
    if isinstance(data, cls):
        return data
    if isinstance(data, str) and hasattr(cls, "choose_class"):
        data = {"name": data}  # `method: dml` is short for `method: {name: dml}`
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__} {data!r}")
    whose = ""
    if hasattr(cls, "choose_class"):
        cls, whose = cls.choose_class(data, path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        prefix = f"not a setting of {whose}; " if whose else "unknown key; "
        raise ConfigError(key, f"{prefix}allowed keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        kwargs[name] = _build_value(hints[name], value, sub)
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        key = f"{path}.{missing[0]}" if path else missing[0]
        raise ConfigError(key, "is required")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(path) if path else err


def to_dict(cfg: Any) -> Any:
    """Plain-data form of a config (the inverse of `build_dataclass`), for YAML and checkpoints."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


# ---------------------------------------------------------------------------------------------
# Overrides: --set a.b=value, peers.1.model=..., peers.*.optimizer.lr=...


def apply_override(data: dict, assignment: str) -> dict:
    """Apply one `key.path=value` override to plain config data (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(assignment, "an override must look like key.path=value")
    if assignment.startswith("imports+="):  # the CLI's --import: add to the config's list
        data["imports"] = [*(data.get("imports") or []), *assignment.split("=", 1)[1].split(",")]
        return data
    key, raw = assignment.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(key.strip(), f"cannot read {raw!r} as a YAML value ({_yaml_problem(err)})") from None
    set_path(data, key.strip(), value)
    return data


def set_path(data: Any, key: str, value: Any) -> None:
    """Set `value` at dotted `key` in nested dicts/lists; `*` applies to every list item."""
    parts = key.split(".")

    def walk(node: Any, i: int, done: str) -> None:
        part = parts[i]
        last = i == len(parts) - 1
        here = f"{done}.{part}" if done else part
        if isinstance(node, list):
            if part == "*":
                targets = range(len(node))
            elif part.isdigit() and int(part) < len(node):
                targets = [int(part)]
            else:
                raise ConfigError(here, f"no list item {part!r}; there are {len(node)} (use 0..{len(node) - 1} or *)")
            for t in targets:
                if last:
                    node[t] = value
                else:
                    walk(node[t], i + 1, f"{done}.{t}" if done else str(t))
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                walk(node[part], i + 1, here)
        else:
            raise ConfigError(here, f"cannot set a key inside a {type(node).__name__}")

    walk(data, 0, "")


def load_config(source: str | Path | dict, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Load a YAML file (or plain dict), apply `--set` overrides, build and validate."""
    if isinstance(source, dict):
        data = yaml.safe_load(yaml.safe_dump(source))  # deep copy through plain data
    else:
        path = Path(source)
        if not path.is_file():  # read before this check, /dev/zero would be read forever
            raise ConfigError("", f"config file {str(path)!r} {_not_a_file(path)}")
        try:
            data = load_yaml(path.read_text()) or {}
        except UnicodeDecodeError:
            raise ConfigError("", f"config file {str(path)!r} is not a text file (YAML expected)") from None
        except yaml.YAMLError as err:
            raise ConfigError("", f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}") from None
        if not isinstance(data, dict):
            raise ConfigError("", f"{path} must hold a mapping at the top level")
    before = copy.deepcopy(data.get("method"))
    for assignment in overrides:
        apply_override(data, assignment)
    import_modules(data.get("imports") or ())
    _switch_method(data, before, overrides)
    cfg = build_dataclass(ExperimentConfig, data)
    if cfg.tune is not None:
        check_search_space(data, cfg.tune)
    return cfg


def _not_a_file(path: Path) -> str:
    """What a config path is that is no regular file (a device, a pipe, a folder), or why not."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist: no such file"
    except OSError as err:
        return f"cannot be read: {err.strerror or first_line(err)}"
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))
    what = next((name for is_kind, name in kinds if is_kind(mode)), "a special file")
    return f"is {what}, not a regular file: a YAML file is expected"


def _switch_method(data: dict, before, overrides: typing.Sequence[str]) -> None:
    """`--set method.name=<another>` on a file written for one method (`kd_mnist1d.yaml` with
    `method.name=logit_regression`): the file's settings of the old method are dropped, saying
    which — a shared name is no shared meaning (KD's `temperature` 4 is not CRD's τ 0.07) — and
    the new method starts from its own defaults; settings given with `--set` are kept (and
    checked: a mistyped one is still refused, naming it)."""
    method = data.get("method")
    if not (isinstance(before, dict) and isinstance(method, dict)) or method.get("name") == before.get("name"):
        return
    if not any(a.split("=", 1)[0].strip() == "method.name" for a in overrides):
        return
    given = {a.split("=", 1)[0].strip()[len("method."):].split(".")[0] for a in overrides if a.startswith("method.")}
    dropped = [k for k in method if k not in given and k in before]
    for k in dropped:
        del method[k]
    if dropped:
        print(f"note: method.name={method['name']}: the file's {before.get('name')} settings "
              f"({', '.join(dropped)}) were dropped; {method['name']} starts from its own defaults", file=sys.stderr)


def import_modules(modules) -> None:
    """Import the config's `imports` (their registrations must exist before names are checked)."""
    if not isinstance(modules, (list, tuple)):
        raise ConfigError("imports", f"expected a list of module names, got {modules!r}")
    for i, module in enumerate(modules):
        try:
            try:
                importlib.import_module(str(module))
            except ModuleNotFoundError:
                # As `python -m` would: a module beside the user, in the working directory (the
                # `codistill` command's own sys.path starts at its script's folder instead).
                if os.getcwd() in sys.path:
                    raise
                sys.path.append(os.getcwd())
                importlib.import_module(str(module))
        except ImportError as err:
            raise ConfigError(f"imports.{i}", f"cannot import {module!r}: {first_line(err)}") from None
        except SystemExit as stop:  # sys.exit() at import, whatever its code: the run never started, so never
            # a silent exit 0 a scheduler would record as success
            raise ConfigError(f"imports.{i}", f"cannot import {module!r}: it exits at import "
                                              f"(SystemExit({stop.code!r})); nothing was run") from None
        except KeyboardInterrupt as stop:  # Ctrl-C (or SIGTERM) in a slow import: say where it was, no traceback
            raise type(stop)(f"while importing {module!r} (imports.{i}); nothing was run") from None
        except Exception as err:  # noqa: BLE001 — the module's own code failed (a syntax error, a raise, a name
            # registered twice): one line naming it, not a traceback through codistill
            cause = err.message if isinstance(err, ConfigError) else f"{type(err).__name__}: {first_line(err)}"
            raise ConfigError(f"imports.{i}", f"cannot import {module!r}: {cause}") from None


def check_search_space(data: dict, tune: TuneSettings) -> None:
    """Every key of the search space must be a config key that accepts the values the
    distribution gives: try them, and name the space key in the error."""
    for key, text in tune.space.items():
        for value in distribution_values(*parse_distribution(text, f"tune.space.{key}")):
            trial = copy.deepcopy(data)
            trial.pop("tune", None)
            try:
                set_path(trial, key, value)
                build_dataclass(ExperimentConfig, trial)
            except ConfigError as err:
                raise ConfigError(f"tune.space.{key}", f"{text} does not fit the config: {err}") from None


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's message on one line: the problem and where (line, column)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def first_difference(asked, stored, path: str = "") -> tuple[str, object, object] | None:
    """(key path, asked value, stored value) of the first difference between two configs."""
    if isinstance(asked, dict) and isinstance(stored, dict):
        for key in list(asked) + [k for k in stored if k not in asked]:
            found = first_difference(asked.get(key), stored.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    if isinstance(asked, list) and isinstance(stored, list) and len(asked) == len(stored):
        for i, (a, b) in enumerate(zip(asked, stored)):
            found = first_difference(a, b, f"{path}.{i}")
            if found:
                return found
        return None
    return None if asked == stored else (path, asked, stored)


def shaped_like(today, stored):
    """`today`'s values under `stored`'s keys, nested dict by dict: a key only `today` has is left
    out, a key only `stored` has keeps its stored value."""
    if not (isinstance(today, dict) and isinstance(stored, dict)):
        return today
    return {k: shaped_like(today[k], v) if k in today else v for k, v in stored.items()}
