"""Run configuration: plain YAML in, frozen dataclasses out.

Every section is a small frozen dataclass. `load_config` builds them from a dict and checks
every key against the dataclass fields, so a typo is an error naming the key path and the
keys that are allowed, never a silently ignored setting. Range checks live in each
dataclass's `__post_init__` and raise `ConfigError(field, message)`; the builder prefixes
the path (e.g. `method.temperature`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


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


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw"] = "adam"
    """Optimizer. SGD uses `momentum` and `nesterov`."""
    lr: float = 1e-2
    """Peak learning rate."""
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    schedule: Literal["constant", "cosine", "multistep"] = "constant"
    """Learning-rate schedule over `train.steps` (multistep: ÷10 at each of `milestones`)."""
    milestones: tuple[float, ...] = (0.5, 0.75)
    """For `multistep`: fractions of training at which the rate drops tenfold."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` over this many steps."""

    def __post_init__(self):
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(all(0 < m < 1 for m in self.milestones), "milestones",
               f"must be fractions in (0, 1), got {list(self.milestones)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerSpec:
    model: str
    """Registered model name (see `codistill.models.MODELS`)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self):
        from codistill.models import MODELS

        _check(self.model in MODELS, "model",
               f"unknown model {self.model!r}; registered: {', '.join(sorted(MODELS))}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    name: str = "mnist1d"
    """Registered data set (see `codistill.data.DATASETS`)."""
    root: str = "~/.cache/codistill"
    """Where data sets are cached or found (CIFAR: the torchvision folder)."""
    batch_size: int = 128
    eval_batch_size: int = 1000
    shard: bool = False
    """Give each peer a disjoint part of the training set (codistillation as parallelism)."""
    train_subset: int = 0
    """Use only the first N training examples (0: all). For quick experiments and tests."""
    augment: bool = True
    """Standard augmentation where the data set defines one (CIFAR: crop + flip)."""
    download: bool = False
    """Allow torchvision to download CIFAR when `root` does not have it."""

    def __post_init__(self):
        from codistill.data import DATASETS

        _check(self.name in DATASETS, "name",
               f"unknown data set {self.name!r}; registered: {', '.join(sorted(DATASETS))}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _check(self.train_subset >= 0, "train_subset", f"must be >= 0, got {self.train_subset}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    steps: int = 3000
    """Optimizer steps per peer."""
    eval_every: int = 250
    """Evaluate every peer, the ensemble and churn on the test split every N steps (and at the end)."""
    checkpoint_every: int = 500
    """Save every peer's state every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (0: all)."""

    def __post_init__(self):
        _check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _check(self.eval_every >= 1, "eval_every", f"must be >= 1, got {self.eval_every}")
        _check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 0, "keep_checkpoints", f"must be >= 0, got {self.keep_checkpoints}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ExchangeConfig:
    transport: Literal["collective", "object_store"] = "collective"
    """How peers see each other on Ray: torch.distributed all_gather, or the Ray object store.
    The local runner always exchanges in-process."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RaySettings:
    address: str | None = None
    """Ray cluster to join (`ray://…`, `host:port`, or `auto`); None starts a local instance.
    `RAY_ADDRESS` in the environment is used when this is None."""
    resources_per_peer: dict[str, float] | None = None
    """Resources one peer reserves, e.g. {GPU: 1} or {CPU: 2}, split evenly over its workers.
    None: one GPU per peer when the cluster has a GPU for every peer, else one CPU."""
    workers_per_peer: int = 1
    """Data-parallel workers (DDP) per peer; peer = rank // workers_per_peer."""
    storage_path: str = "runs"
    """Where checkpoints and records go: a local directory, NFS path or s3://bucket/prefix."""
    max_failures: int = 0
    """Worker failures Ray Train recovers from (restarting from the newest checkpoint)."""
    placement_strategy: Literal["SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"] = "SPREAD"
    """How peers are placed on nodes. SPREAD (best effort) gives each peer a node of its own
    when there are enough, so a node failure takes one peer and peers do not share a node's
    CPUs; PACK keeps them together (fastest per-step exchange over NVLink on one multi-GPU node)."""

    def __post_init__(self):
        _check(self.workers_per_peer >= 1, "workers_per_peer", f"must be >= 1, got {self.workers_per_peer}")
        _check(self.max_failures >= -1, "max_failures", f"must be >= -1 (-1: unlimited), got {self.max_failures}")
        for name, amount in (self.resources_per_peer or {}).items():
            _check(amount >= 0, f"resources_per_peer.{name}", f"must be >= 0, got {amount}")


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
        args = yaml.safe_load(f"[{rest[:-1]}]")
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


@dataclass(frozen=True, kw_only=True, slots=True)
class TuneSettings:
    space: dict[str, str] = field(default_factory=dict)
    """Config key path → distribution, e.g. `method.temperature: loguniform(1, 10)`,
    `peers.*.optimizer.lr: loguniform(1e-3, 1e-1)`, `method.weight: uniform(0, 1)`."""
    objective: Literal["best_accuracy", "mean_accuracy", "ensemble_accuracy"] = "ensemble_accuracy"
    """What a trial is judged by, reported at every evaluation (so ASHA can stop it early)."""
    num_samples: int = 8
    """Trials to sample (with `grid(...)` values: repetitions of the grid)."""
    max_concurrent: int = 1
    """Trials running at once; each trial is a whole group of peers."""
    scheduler: Literal["asha", "fifo"] = "asha"
    search: Literal["random", "optuna"] = "random"
    grace_period: int = 1
    """ASHA: evaluations a trial always gets before it may be stopped."""
    reduction_factor: int = 2
    """ASHA: keep the top 1/reduction_factor at each rung."""

    def __post_init__(self):
        for key, text in self.space.items():
            parse_distribution(text, f"space.{key}")
        _check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        _check(self.max_concurrent >= 1, "max_concurrent", f"must be >= 1, got {self.max_concurrent}")
        _check(self.grace_period >= 1, "grace_period", f"must be >= 1, got {self.grace_period}")
        _check(self.reduction_factor >= 2, "reduction_factor", f"must be >= 2, got {self.reduction_factor}")
        if self.search == "optuna":
            grids = [k for k, t in self.space.items() if t.strip().startswith("grid(")]
            _check(not grids, f"space.{grids[0] if grids else ''}", "grid(...) cannot be used with search: optuna")


@dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentConfig:
    name: str = "run"
    """Run name: the folder under `ray.storage_path`; re-running a name resumes it."""
    seed: int = 0
    method: Any = None  # a MethodConfig subclass, chosen by `method.name`
    peers: tuple[PeerSpec, ...] = ()
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)
    ray: RaySettings = field(default_factory=RaySettings)
    tune: TuneSettings | None = None
    """The search space and sweep settings of `codistill tune` (ignored by `codistill train`)."""

    def __post_init__(self):
        _check(self.method is not None, "method", "is required (e.g. `method: {name: dml}`)")
        _check(len(self.peers) >= 1, "peers", "needs at least one peer")
        self.method.check_peers(self.peers)
        from codistill.data import DATASETS
        from codistill.models import MODELS

        data_kind = DATASETS[self.data.name].input_kind
        for i, peer in enumerate(self.peers):
            model_kind = MODELS[peer.model].input_kind
            _check(model_kind == data_kind, f"peers.{i}.model",
                   f"model {peer.model!r} takes {model_kind} input but data set {self.data.name!r} "
                   f"gives {data_kind}; models for {data_kind}: "
                   + ", ".join(sorted(n for n, m in MODELS.items() if m.input_kind == data_kind)))

    @property
    def num_peers(self) -> int:
        return len(self.peers)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with key paths in every error


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
        raise ConfigError(path, f"unsupported union type {tp}")
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
            return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    raise ConfigError(path, f"unsupported type {tp}")


def build_dataclass(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types name their path."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(key, f"unknown key; allowed keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        if cls is ExperimentConfig and name == "method":
            kwargs[name] = _build_method(value, sub)
        else:
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


def _build_method(value: Any, path: str) -> Any:
    from codistill.methods import METHODS

    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{path}.name", f"is required; registered methods: {', '.join(sorted(METHODS))}")
    name = value["name"]
    if name not in METHODS:
        raise ConfigError(f"{path}.name", f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    try:
        return build_dataclass(METHODS[name].config_class, value, path)
    except ConfigError as err:
        if "unknown key" in err.message:  # most likely a setting of another method
            raise ConfigError(err.path, f"not a setting of method {name!r}; {err.message.split('; ', 1)[1]}") from None
        raise


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
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
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
        if not path.exists():
            raise ConfigError("", f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError("", f"{path} must hold a mapping at the top level")
    for assignment in overrides:
        apply_override(data, assignment)
    cfg = build_dataclass(ExperimentConfig, data)
    if cfg.tune is not None:
        check_search_space(data, cfg.tune)
    return cfg


def check_search_space(data: dict, tune: TuneSettings) -> None:
    """Every key of the search space must be a config key that accepts the values the
    distribution gives: try them, and name the space key in the error."""
    import copy

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
