"""The cells of a comparison and what is cached of them: a method as the command line names it
(`MethodSpec`), the config of a cell (method × seed, at its tuned values), the figures of a
finished cell's run, and the check that a stored cell or tuning is exactly the one asked for
(`compare.py` has the command; `paired.py` the statistics; `compare_report.py` the table and plot)."""

from __future__ import annotations

import copy
import dataclasses
import statistics
from dataclasses import dataclass

import yaml

from codistill.config import ExperimentConfig, build_dataclass, data_parallel, first_difference, load_config, load_yaml, set_path, to_dict
from codistill.config.method import METHOD_CONFIGS, MethodConfig
from codistill.errors import ConfigError
from codistill.experiments.speed import curve
from codistill.metrics import ACCURACY, score_of
from codistill.records import read_records
from codistill.storage import RunStorage

FIGURES = ("first", "best", "mean", "ensemble", "churn")

DATA_PARALLEL = "data_parallel"
"""Not a method but the alternative its workers have: one model on all the group's workers, the
config transformed by `config.data_parallel.data_parallel`; `--tune` searches around its
learning rate exactly as around every method's recipe."""

DATA_PARALLEL_SECTIONS = ("train", "data", "peers", "ray")
"""The config sections a `data_parallel:` setting may change: what one model trained with the
cross-entropy alone reads."""


@dataclass(frozen=True)
class MethodSpec:
    label: str
    """As given on the command line, e.g. `kdcl:variant=min_logit`."""
    name: str
    settings: dict

    @property
    def slug(self) -> str:
        """The label as one folder name."""
        return self.label.replace(":", ".").replace(",", ".")


def parse_method(text: str) -> MethodSpec:
    """`name` or `name:key=value,key=value` (values are YAML: `branches=3`, `variant=mean`,
    `taps=[conv2,conv3]` — a comma inside brackets belongs to the value)."""
    name, _, rest = text.partition(":")
    registered = ", ".join(METHOD_CONFIGS.names())
    if name not in METHOD_CONFIGS and name != DATA_PARALLEL:
        raise ConfigError("--methods", f"{text!r}: no method {name!r}; registered methods: {registered} "
                                       f"(and {DATA_PARALLEL}: one model on all the group's workers)")
    settings = {}
    for item in filter(None, _top_level_split(rest)):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError("--methods", f"{text!r}: settings are key=value pairs after `name:`, e.g. kdcl:variant=mean")
        try:
            settings[key.strip()] = load_yaml(value)
        except yaml.YAMLError as err:
            problem = str(getattr(err, "problem", None) or "not valid YAML")
            raise ConfigError("--methods", f"{text!r}: the value of {key.strip()!r} is not valid YAML ({problem}): "
                              f"{value!r}; e.g. 3, mean, [conv2, conv3]") from None
    if name == DATA_PARALLEL and any("." not in key for key in settings):
        raise ConfigError("--methods", f"{text!r}: {DATA_PARALLEL} is not a method and has no method settings; "
                                       "it takes dotted config settings only, e.g. data_parallel:train.label_smoothing=0.1")
    unusable = [key for key in settings if name == DATA_PARALLEL and key.split(".")[0] not in DATA_PARALLEL_SECTIONS]
    if unusable:  # e.g. method.temperature: the arm trains with the cross-entropy alone, nothing would read it
        raise ConfigError("--methods", f"{text!r}: {DATA_PARALLEL} cannot use {unusable[0]!r} (one model, the "
                                       "cross-entropy alone: no method, exchange or teacher); it takes settings under "
                                       f"{', '.join(s + '.' for s in DATA_PARALLEL_SECTIONS)} e.g. "
                                       "data_parallel:train.label_smoothing=0.1")
    return MethodSpec(text, name, settings)


def _top_level_split(text: str) -> list[str]:
    """`text` split at the commas outside brackets and braces."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def method_section(spec: MethodSpec, tuned: dict) -> dict:
    section = {"name": method_name(spec), **{k: v for k, v in spec.settings.items() if "." not in k}}
    for key, value in tuned.items():
        if key.startswith("method."):
            section[key[len("method."):]] = value
    return section


def cell_recipe(base: dict, spec: MethodSpec) -> dict:
    """The base config with the method in place at its recipe's point (nothing tuned or set yet):
    the `data_parallel` arm the config transformed (`config.data_parallel`); a method that trains
    one network of branches gets one peer, peer 0's."""
    data = copy.deepcopy(base)
    data["method"] = method_section(spec, {})
    data.pop("tune", None)
    if spec.name == DATA_PARALLEL:
        return to_dict(data_parallel(load_config(data)))
    if trains_one_network(data):
        data["peers"] = data["peers"][:1]
    return data


def cell_data(base: dict, spec: MethodSpec, tuned: dict, recipe: dict | None = None) -> dict:
    """The cell's config: its recipe (`cell_recipe`, or `recipe` when already made) with the
    method's tuned values and the label's dotted settings in place."""
    data = copy.deepcopy(recipe if recipe is not None else cell_recipe(base, spec))
    data["method"] = method_section(spec, tuned)
    for key, value in [*tuned.items(), *((k, v) for k, v in spec.settings.items() if "." in k)]:
        if not key.startswith("method."):
            set_path(data, key, value)  # a tuned value, or a dotted setting of the recipe: codistill:exchange.top_k=8
    return data


def method_name(spec: MethodSpec) -> str:
    """The registered method a cell of `spec` trains with."""
    return "independent" if spec.name == DATA_PARALLEL else spec.name


def trains_one_network(data: dict) -> bool:
    """Whether the method section trains one network of branches: the method's config says."""
    return build_dataclass(MethodConfig, data["method"], "method").trains_one_network


def search_space(spec: MethodSpec, recipe: dict) -> dict[str, str]:
    """The same kind of space for every method: learning rate (÷4 … ×4 the config's), schedule
    and label smoothing (0 … 0.2: the regularisation baseline, Sinha et al. 2021, so a gain that
    is only regularisation shows as such) for all; temperature and weight where the method has
    them, around the method's recipe (`cell_recipe`). What the command line fixes is not searched."""
    lr = recipe["peers"][0]["optimizer"]["lr"]
    space = {"peers.*.optimizer.lr": f"loguniform({lr / 4:.6g}, {lr * 4:.6g})",
             "peers.*.optimizer.schedule": "choice(['constant', 'cosine'])"}
    if "train.label_smoothing" not in spec.settings:
        space["train.label_smoothing"] = "uniform(0, 0.2)"
    fields = {f.name for f in dataclasses.fields(METHOD_CONFIGS.get(method_name(spec), "--methods"))}
    if "temperature" in fields and "temperature" not in spec.settings:
        space["method.temperature"] = "loguniform(1, 8)"
    if "weight" in fields and "weight" not in spec.settings:
        space["method.weight"] = "uniform(0.1, 2)"
    return space


# ---------------------------------------------------------------------------------------------
# Figures of one finished run


def run_figures(storage: RunStorage, steps: int, cell: ExperimentConfig | None = None) -> dict | None:
    """The group's figures at the last evaluation and at the best one, or None when the run
    has not reached `steps`; with the `cell` it ran, its curve too (`speed.curve`)."""
    try:
        table = read_records(storage)
    except FileNotFoundError:
        return None
    records = table.to_pylist()
    rows = [r for r in records if r["split"] == "test" and r["peer"] == 0]
    if not rows or max(r["step"] for r in rows) < steps:
        return None
    by_step = {r["step"]: r for r in rows}

    def figures(r: dict) -> dict:
        return {name: r[f"member_{name}_accuracy" if name != "churn" else "member_churn"] for name in FIGURES}

    last = by_step[max(by_step)]
    best = max(by_step.values(), key=lambda r: (r["member_mean_accuracy"], -r["step"]))
    score = score_of(last)
    extra = {"metric": score.name}
    if score is not ACCURACY:  # the task's own score (bits per token), each peer's and the ensemble's
        name = score.name
        values = [r[name] for r in records if r["split"] == "test" and r["step"] == last["step"]]
        extra.update({f"{name}_first": last[name], f"{name}_best": score.best(values),
                      f"{name}_mean": statistics.mean(values), f"{name}_ensemble": last[f"ensemble_{name}"]})
    sent = [r["bytes_sent"] for r in records if r["split"] == "train" and r.get("bytes_sent")]
    if sent:
        extra["bytes_per_round"] = statistics.mean(sent)
    if cell is not None:
        extra.update(curve(records, cell.data.batch_size, len(cell.peers)))
    return {**{f"last_{k}": v for k, v in figures(last).items()},
            **{f"bestevaluation_{k}": v for k, v in figures(best).items()},
            "best_step": best["step"], "last_step": last["step"], **extra}


# ---------------------------------------------------------------------------------------------
# A cached result is reused only when it is the result of exactly what was asked


def what_it_trains(data: dict) -> dict:
    """A config as far as it decides the result: where it runs (`ray`) and is watched (`tracking`) do not."""
    return {k: v for k, v in data.items() if k not in ("ray", "tracking")}


def stored_cell_difference(cell: ExperimentConfig, storage: RunStorage) -> tuple[str, object, object] | None:
    """How the run stored under the cell's name differs from the cell asked for (None: the same,
    or nothing stored)."""
    from codistill.engine.run import CONFIG_FILE, stored_as_of_today

    if not storage.exists(CONFIG_FILE):
        return None
    stored = stored_as_of_today(load_yaml(storage.read_bytes(CONFIG_FILE).decode()))
    return first_difference(what_it_trains(to_dict(cell)), what_it_trains(stored))


def refuse_or_forget(what: str, where: RunStorage | None, path: str, difference, fresh: bool, log) -> None:
    key, asked, stored = difference
    if not fresh:
        raise ConfigError("--methods", f"{what} in {where.uri if where else path} was made with {key}={stored!r}, "
                          f"this command asks {key}={asked!r}; nothing was run. Use another `name` (--set name=…) "
                          "to keep both, or --fresh to discard those results and run them again")
    log(f"{what}: made with {key}={stored!r}, asked {key}={asked!r}: discarded (--fresh)")
    if where is not None:
        where.fs.delete_dir(where.run_dir)


TUNE_SEEDS = 2
"""Seeds each trial trains, judged by their mean: a validation fifth of MNIST-1D is 800
examples (a standard error of ~0.8 points at 94%), so one seed picks by luck."""


def cell_name(name: str, spec: MethodSpec, seed: int) -> str:
    return f"{name}.{spec.slug}.seed{seed}"


def cell_config(base: dict, spec: MethodSpec, tuning: dict | None, seed: int, name: str) -> ExperimentConfig:
    """The cell (method `spec`, `seed`) of the comparison `name`, at the method's tuned values."""
    data = cell_data(base, spec, tuning["params"] if tuning else {})
    data.update(seed=seed, name=cell_name(name, spec, seed))
    return load_config(data)
