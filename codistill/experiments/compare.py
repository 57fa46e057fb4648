"""`codistill compare`: several methods × seeds under one recipe, reported the way the field
argues about them.

Every cell (method, seed) is an ordinary run named `<name>.<method>.seed<k>` under the
config's storage path, so a re-run skips the finished cells and resumes an interrupted one —
but only a cell whose stored config is exactly the one this command would run: otherwise the
command stops before running anything, naming the first key that differs (`--fresh` discards
such cells and runs them again). From each run's records come the group's figures — its
members are the peers, or the branches of a method that trains one network — first member,
best member, mean member, ensemble and churn, at the last evaluation and (separately
labelled) at the evaluation with the best mean member.

A seed fixes every peer's initial weights and batches whatever the method, so the methods are
paired by seed: each method's result is reported as its per-seed difference to the baseline
(`--baseline`, default the first method), with the mean difference, a 95% t-interval over the
seeds and wins k of n. An interval that includes 0 is "no resolvable effect", not a ranking.
Written beside the runs: `<name>/compare.parquet` (one row per cell, with its differences),
`compare.md` and `compare.png` (the differences around 0, and the accuracies).

`--tune N` gives every method, the baseline included, the same budget first: N Ray Tune
trials over its learning rate and schedule and — where the method has them — its
temperature and weight, the first trial at its recipe's own setting (the paper's), the rest
random (seeded); each trial trains `TUNE_SEEDS` seeds on the training set less a held-out
validation fifth and is judged by their mean member accuracy there. The seeds then run with
each method's own best values on the whole training set and are tested on the test set,
which tuning never saw. The saved tuning is reused only for exactly the same tuning.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import statistics
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from codistill.config import ExperimentConfig, build_dataclass, first_difference, load_config, set_path, to_dict
from codistill.config.method import METHOD_CONFIGS, MethodConfig
from codistill.errors import ConfigError, RunError
from codistill.records import read_records
from codistill.storage import RunStorage, resolve_storage_path

FIGURES = ("first", "best", "mean", "ensemble", "churn")
TABLE_FILE, MARKDOWN_FILE, PLOT_FILE = "compare.parquet", "compare.md", "compare.png"
VALIDATION = 0.2


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
    if name not in METHOD_CONFIGS:
        raise ConfigError("--methods", f"{text!r}: no method {name!r}; registered methods: {registered}")
    settings = {}
    for item in filter(None, _top_level_split(rest)):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError("--methods", f"{text!r}: settings are key=value pairs after `name:`, e.g. kdcl:variant=mean")
        try:
            settings[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = str(getattr(err, "problem", None) or "not valid YAML")
            raise ConfigError("--methods", f"{text!r}: the value of {key.strip()!r} is not valid YAML ({problem}): "
                              f"{value!r}; e.g. 3, mean, [conv2, conv3]") from None
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
    section = {"name": spec.name, **{k: v for k, v in spec.settings.items() if "." not in k}}
    for key, value in tuned.items():
        if key.startswith("method."):
            section[key[len("method."):]] = value
    return section


def cell_data(base: dict, spec: MethodSpec, tuned: dict) -> dict:
    """The base config with the method (and its tuned values) in place. A method that trains
    one network of branches gets one peer, peer 0's."""
    data = copy.deepcopy(base)
    data["method"] = method_section(spec, tuned)
    data.pop("tune", None)
    if _one_network(data):
        data["peers"] = data["peers"][:1]
    for key, value in [*tuned.items(), *((k, v) for k, v in spec.settings.items() if "." in k)]:
        if not key.startswith("method."):
            set_path(data, key, value)  # a tuned value, or a dotted setting of the recipe: codistill:exchange.top_k=8
    return data


def _one_network(data: dict) -> bool:
    """Whether the method section trains one network of branches: the method's config says."""
    return build_dataclass(MethodConfig, data["method"], "method").trains_one_network


def search_space(spec: MethodSpec, base: dict) -> dict[str, str]:
    """The same kind of space for every method: learning rate (÷4 … ×4 the config's) and
    schedule for all; temperature and weight where the method has them and the command line
    did not fix them."""
    lr = base["peers"][0]["optimizer"]["lr"]
    space = {"peers.*.optimizer.lr": f"loguniform({lr / 4:.6g}, {lr * 4:.6g})",
             "peers.*.optimizer.schedule": "choice(['constant', 'cosine'])"}
    fields = {f.name for f in dataclasses.fields(METHOD_CONFIGS.get(spec.name, "--methods"))}
    if "temperature" in fields and "temperature" not in spec.settings:
        space["method.temperature"] = "loguniform(1, 8)"
    if "weight" in fields and "weight" not in spec.settings:
        space["method.weight"] = "uniform(0.1, 2)"
    return space


# ---------------------------------------------------------------------------------------------
# Figures of one finished run


def run_figures(storage: RunStorage, steps: int) -> dict | None:
    """The group's figures at the last evaluation and at the best one, or None when the run
    has not reached `steps`."""
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
    extra = {}
    if last.get("bits") is not None:  # language models: bits per token, each peer's and the ensemble's
        bits = [r["bits"] for r in records if r["split"] == "test" and r["step"] == last["step"]]
        extra.update(bits_first=last["bits"], bits_best=min(bits), bits_mean=statistics.mean(bits),
                     bits_ensemble=last["ensemble_bits"])
    sent = [r["bytes_sent"] for r in records if r["split"] == "train" and r.get("bytes_sent")]
    if sent:
        extra["bytes_per_round"] = statistics.mean(sent)
    return {**{f"last_{k}": v for k, v in figures(last).items()},
            **{f"bestevaluation_{k}": v for k, v in figures(best).items()},
            "best_step": best["step"], "last_step": last["step"], **extra}


# ---------------------------------------------------------------------------------------------
# A cached result is reused only when it is the result of exactly what was asked


def _what_it_trains(data: dict) -> dict:
    """A config as far as it decides the result: where it runs (`ray`) does not."""
    return {k: v for k, v in data.items() if k != "ray"}


def stored_cell_difference(cell: ExperimentConfig, storage: RunStorage) -> tuple[str, object, object] | None:
    """How the run stored under the cell's name differs from the cell asked for (None: the same,
    or nothing stored)."""
    from codistill.engine.run import CONFIG_FILE, stored_as_of_today

    if not storage.exists(CONFIG_FILE):
        return None
    stored = stored_as_of_today(yaml.safe_load(storage.read_bytes(CONFIG_FILE).decode()))
    return first_difference(_what_it_trains(to_dict(cell)), _what_it_trains(stored))


def _refuse_or_forget(what: str, where: RunStorage | None, path: str, difference, fresh: bool, log) -> None:
    key, asked, stored = difference
    if not fresh:
        raise ConfigError("--methods", f"{what} in {where.uri if where else path} was made with {key}={stored!r}, "
                          f"this command asks {key}={asked!r}; nothing was run. Use another `name` (--set name=…) "
                          "to keep both, or --fresh to discard those results and run them again")
    log(f"{what}: made with {key}={stored!r}, asked {key}={asked!r}: discarded (--fresh)")
    if where is not None:
        where.fs.delete_dir(where.run_dir)


# ---------------------------------------------------------------------------------------------
# Tuning: the same budget for every method, starting at its recipe's (the paper's) setting

TUNE_SEEDS = 2
"""Seeds each trial trains, judged by their mean: a validation fifth of MNIST-1D is 800
examples (a standard error of ~0.8 points at 94%), so one seed picks by luck."""


def tuning_data(spec: MethodSpec, base: dict, name: str, trials: int) -> dict:
    data = cell_data(base, spec, {})
    data["name"] = f"{name}.{spec.slug}.tune"
    data["data"]["validation"] = VALIDATION
    data["data"]["test_examples"] = 0  # the validation split replaces the test set
    data["tune"] = {"space": search_space(spec, base), "objective": "member_mean_accuracy", "num_samples": trials,
                    "max_concurrent": 1, "scheduler": "fifo", "search": "random", "backend": "local",
                    "start_at_config": True, "seeds_per_trial": TUNE_SEEDS}
    return to_dict(load_config(data))


def saved_tuning(spec: MethodSpec, asked: dict, storage: RunStorage, fresh: bool, log) -> dict | None:
    """The saved tuning of `spec`, if it was made by exactly the tuning asked for."""
    saved = f"tuned/{spec.slug}.json"
    if not storage.exists(saved):
        return None
    record = json.loads(storage.read_bytes(saved))
    difference = first_difference(_what_it_trains(asked), _what_it_trains(record.get("config", {})))
    if difference is None:
        return record
    _refuse_or_forget(f"the saved tuning of {spec.label}", None, f"{storage.uri}/{saved}", difference, fresh, log)
    storage.delete(saved)
    return None


def tune_method(spec: MethodSpec, asked: dict, storage: RunStorage) -> dict:
    """The method's tuning (kept in `tuned/<method>.json`; a re-run of the same tuning does not
    tune again): its best values after the trials on the validation split, the first trial
    being the recipe's own setting, and both figures — what tuning bought."""
    from codistill.experiments.tune import config_point, run_sweep, trial_params

    result = run_sweep(load_config(asked), on_change="restart")  # compare decided already: not the tuning asked
    if result.best_config is None:
        errors = [r["error"] for r in result.table.to_pylist() if r["error"]]
        raise RunError(f"tuning {spec.label} finished no trial" + (f": {errors[0]}" if errors else ""))
    rows = result.table.to_pylist()
    finished = [r for r in rows if r["status"] == "TERMINATED" and r["objective"] is not None]
    best = max(finished, key=lambda r: r["objective"])
    default_params = config_point(asked, asked["tune"]["space"])
    default = next((r for r in finished if trial_params(r) == default_params), None)
    record = {"params": trial_params(best), "validation_objective": best["objective"], "default_params": default_params,
              "default_objective": default["objective"] if default else None, "trials": len(rows),
              "seeds_per_trial": asked["tune"]["seeds_per_trial"], "config": asked}
    storage.write_bytes(f"tuned/{spec.slug}.json", json.dumps(record, indent=1).encode())
    return record


# ---------------------------------------------------------------------------------------------
# Paired differences to the baseline

# Two-sided 95% quantiles of Student's t by degrees of freedom (1 … 30); beyond, the normal's.
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]
PAIRED = ("mean", "ensemble", "best")


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean over seeds (n ≥ 2; n = 1 gives ±inf)."""
    n, mean = len(values), statistics.mean(values)
    if n < 2:
        return mean, float("-inf"), float("inf")
    half = (T_975[n - 2] if n - 2 < len(T_975) else 1.96) * statistics.stdev(values) / n ** 0.5
    return mean, mean - half, mean + half


def paired_differences(rows: list[dict], baseline: str) -> list[dict]:
    """Per method: the per-seed difference to the baseline on the same seed (percentage points),
    their mean with a 95% t-interval over seeds, and wins k of n — for the mean member, the
    ensemble and the best member at the last step. Adds `diff_<figure>` to each row."""
    base = {r["seed"]: r for r in rows if r["method"] == baseline}
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r["seed"] in base]
        entry = {"method": method, "baseline": baseline, "seeds": len(mine)}
        for figure in PAIRED:
            diffs = [100 * (r[f"last_{figure}"] - base[r["seed"]][f"last_{figure}"]) for r in mine]
            for r, d in zip(mine, diffs):
                r[f"diff_{figure}"] = d
            if method == baseline or not diffs:
                continue
            mean, low, high = t_interval(diffs)
            entry.update({f"diff_{figure}": mean, f"diff_{figure}_low": low, f"diff_{figure}_high": high,
                          f"wins_{figure}": sum(d > 0 for d in diffs)})
        if method != baseline:
            summary.append(entry)
    return summary


def resolving_seeds(diffs: list[float], half_width: float = 0.5) -> int | None:
    """Seeds whose t-interval would be ±`half_width` points at this spread (None: no spread yet)."""
    if len(diffs) < 2 or statistics.stdev(diffs) == 0:
        return None
    sd = statistics.stdev(diffs)
    n = 2
    while (T_975[n - 2] if n - 2 < len(T_975) else 1.96) * sd / n ** 0.5 > half_width:
        n += 1
    return n


def difference_text(entry: dict, figure: str) -> str:
    mean, low, high = (entry[f"diff_{figure}{s}"] for s in ("", "_low", "_high"))
    # One seed has no spread, so no interval: never printed as [-inf, +inf], never an effect.
    interval = f"[{low:+.2f}, {high:+.2f}]" if entry["seeds"] > 1 else "[n/a: 1 seed]"
    verdict = "" if entry["seeds"] > 1 and (low > 0 or high < 0) else " (no resolvable effect)"
    return f"{mean:+.2f} {interval} {entry[f'wins_{figure}']}/{entry['seeds']}{verdict}"


# ---------------------------------------------------------------------------------------------
# The comparison


@dataclass
class Comparison:
    table: pa.Table
    markdown: str
    storage: RunStorage
    differences: list[dict]


def compare(cfg: ExperimentConfig, methods: list[str], seeds: list[int], backend: str = "local",
            tune_trials: int = 0, log=print, baseline: str | None = None, fresh: bool = False) -> Comparison:
    from codistill.engine.run import CONFIG_FILE, train_connected

    specs = [parse_method(m) for m in methods]
    if len({s.slug for s in specs}) != len(specs):
        raise ConfigError("--methods", "a method is listed twice")
    if not seeds:
        raise ConfigError("--seeds", "name at least one seed")
    baseline = baseline or specs[0].label
    if baseline not in [s.label for s in specs]:
        raise ConfigError("--baseline", f"{baseline!r} is not among --methods: {', '.join(s.label for s in specs)}")
    base = to_dict(dataclasses.replace(cfg, tune=None))
    storage_path = resolve_storage_path(cfg.ray.storage_path)
    base["ray"]["storage_path"] = storage_path
    storage = RunStorage(storage_path, cfg.name)
    same_models = len({p["model"] for p in base["peers"]}) == 1

    # First every check, then every run: a cached result that is not what this command asks
    # for stops the command before anything runs (or, with --fresh, is discarded).
    plan = []
    for spec in specs:
        probe = cell_data(base, spec, {})
        one_network = _one_network(probe)
        if one_network and not same_models:
            log(f"{spec.label}: n/a — one network of branches needs peers of one model")
            continue
        load_config({**probe, "name": "probe"})  # a bad setting is said before anything runs
        asked = tuning_data(spec, base, cfg.name, tune_trials) if tune_trials else None
        tuning = saved_tuning(spec, asked, storage, fresh, log) if asked else None
        plan.append((spec, one_network, asked, tuning))
        for seed in seeds:
            run_storage = RunStorage(storage_path, _cell_name(cfg.name, spec, seed))
            if asked and tuning is None:  # to be tuned: a stored cell cannot be from this tuning
                if run_storage.exists(CONFIG_FILE):
                    _refuse_or_forget(f"cell {spec.label} seed {seed}", run_storage, "", (
                        "tuned values", "(tuned by this command)", "(from a tuning that is not saved)"), fresh, log)
                continue
            cell = _cell(base, spec, tuning, seed, cfg.name)
            difference = stored_cell_difference(cell, run_storage)
            if difference and difference[0] == "train.steps" and run_figures(run_storage, cell.train.steps) is None:
                continue  # an unfinished cell goes on to the steps asked, where its schedule allows (train checks)
            if difference:
                _refuse_or_forget(f"cell {spec.label} seed {seed}", run_storage, "", difference, fresh, log)

    rows = []
    for spec, one_network, asked, tuning in plan:
        if asked and tuning is None:
            tuning = tune_method(spec, asked, storage)
        if tuning:
            log(f"{spec.label}: tuned {json.dumps(tuning['params'])} (validation {100 * tuning['validation_objective']:.2f}%"
                + (f"; its recipe's setting {100 * tuning['default_objective']:.2f}%)" if tuning["default_objective"]
                   is not None else ")"))
        for seed in seeds:
            cell = _cell(base, spec, tuning, seed, cfg.name)
            run_storage = RunStorage(storage_path, cell.name)
            figures = run_figures(run_storage, cell.train.steps)
            if figures is None:
                train_connected(cell, backend)
                figures = run_figures(run_storage, cell.train.steps)
                if figures is None:
                    raise RunError(f"{cell.name} ended without its final evaluation")
            else:
                log(f"{spec.label} seed {seed}: finished before with this exact config, not rerun")
            rows.append({"method": spec.label, "seed": seed, "run": cell.name, "one_network": one_network,
                         "members": len(cell.peers) if not one_network else cell.method.branches,
                         "tuned": json.dumps(tuning["params"] if tuning else {}),
                         "tuned_validation": tuning["validation_objective"] if tuning else None,
                         "default_validation": tuning["default_objective"] if tuning else None, **figures})
            log(f"{spec.label} seed {seed}: mean member {100 * figures['last_mean']:.2f}%, "
                f"ensemble {100 * figures['last_ensemble']:.2f}%")
    differences = paired_differences(rows, baseline)
    # Every column any row has (from_pylist reads the first row's keys only: a codistillation
    # row's bytes per round would vanish behind an independent first row).
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(TABLE_FILE, buffer.getvalue())
    markdown = markdown_table(rows, cfg, tune_trials, differences, baseline)
    storage.write_bytes(MARKDOWN_FILE, markdown.encode())
    plot_comparison(rows, differences, baseline, storage)
    return Comparison(table, markdown, storage, differences)


def _cell_name(name: str, spec: MethodSpec, seed: int) -> str:
    return f"{name}.{spec.slug}.seed{seed}"


def _cell(base: dict, spec: MethodSpec, tuning: dict | None, seed: int, name: str) -> ExperimentConfig:
    """The cell (method `spec`, `seed`) of the comparison `name`, at the method's tuned values."""
    data = cell_data(base, spec, tuning["params"] if tuning else {})
    data.update(seed=seed, name=_cell_name(name, spec, seed))
    return load_config(data)


def mean_std(values: list[float], scale: float = 100, digits: int = 2) -> str:
    """Mean ± sample std over seeds (accuracies as %; bits per token unscaled, 3 digits)."""
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _tuned_text(tuned: str) -> str:
    params = json.loads(tuned)
    short = {"peers.*.optimizer.lr": "lr", "peers.*.optimizer.schedule": "", "method.temperature": "T",
             "method.weight": "w"}
    parts = [f"{short.get(k, k)}={v:.3g}" if isinstance(v, float) else (v if short.get(k) == "" else f"{short.get(k, k)}={v}")
             for k, v in params.items()]
    return " ".join(parts)


def markdown_table(rows: list[dict], cfg: ExperimentConfig, tune_trials: int, differences: list[dict] | None = None,
                   baseline: str | None = None) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    peers = " + ".join(p.model for p in cfg.peers)
    test = (f"a generated test set of {cfg.data.test_examples} examples" if cfg.data.test_examples
            else "the data set's test split")
    lines = [f"Peers {peers}; {cfg.train.steps} steps; seeds {', '.join(map(str, seeds))}; {test}; test accuracy (%) "
             "of the group's members (peers, or branches of one network)."
             + (f" Each method tuned alike: {tune_trials} trials on a validation split (the first at its recipe's "
                f"setting), each trial the mean of {TUNE_SEEDS} seeds." if tune_trials else "")]
    if differences:
        lines += ["", f"**paired difference to {baseline} at the last step** (percentage points, same seeds: mean "
                  "[95% t-interval over seeds], wins k of n; an interval that includes 0 is no resolvable effect)", "",
                  "| method | mean member | ensemble | best member | seeds for ±0.5 (mean member) |", "|---|---|---|---|---|"]
        for entry in differences:
            mine = [r["diff_mean"] for r in rows if r["method"] == entry["method"] and "diff_mean" in r]
            needed = resolving_seeds(mine)
            cells = " | ".join(difference_text(entry, f) for f in PAIRED)
            lines.append(f"| {entry['method']} | {cells} | {needed if needed else '—'} |")
    if tune_trials:
        lines += ["", "**what tuning bought** (validation, mean member, mean of the trial's seeds)", "",
                  "| method | recipe's setting | chosen | chosen values |", "|---|---|---|---|"]
        for method in methods:
            first = next(r for r in rows if r["method"] == method)
            default = f"{100 * first['default_validation']:.2f}" if first["default_validation"] is not None else "—"
            lines.append(f"| {method} | {default} | {100 * first['tuned_validation']:.2f} | {_tuned_text(first['tuned'])} |")
    for prefix, title in (("last", "at the last step"), ("bestevaluation", "at the best evaluation (by mean member; labelled: not a last-step figure)")):
        lines += ["", f"**{title}**: mean ± std over seeds; churn (%) is the share of test examples two members disagree on", "",
                  "| method | members | first | best | mean | ensemble | churn |", "|---|---|---|---|---|---|---|"]
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            cells = " | ".join(mean_std([r[f"{prefix}_{k}"] for r in mine]) for k in FIGURES)
            lines.append(f"| {method} | {mine[0]['members']} | {cells} |")
    if any("bits_mean" in r for r in rows):
        lines += ["", "**bits per token at the last step** (test; lower is better) and bytes a peer sent per round", "",
                  "| method | first | best | mean | ensemble | bytes / round |", "|---|---|---|---|---|---|"]
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            cells = " | ".join(mean_std([r[f"bits_{k}"] for r in mine], scale=1, digits=3) for k in ("first", "best", "mean", "ensemble"))
            sent = [r["bytes_per_round"] for r in mine if r.get("bytes_per_round")]
            lines.append(f"| {method} | {cells} | {f'{statistics.mean(sent):,.0f}' if sent else '—'} |")
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[dict], differences: list[dict], baseline: str, storage: RunStorage) -> None:
    """Left: each method's paired differences to the baseline (per seed, and the mean with its
    95% interval) around 0; right: the accuracies themselves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    others = [e["method"] for e in differences]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8.0, 1.2 * len(methods) + 4), 4.0))
    for i, entry in enumerate(differences):
        for k, figure in enumerate(("mean", "ensemble")):
            x = i + (k - 0.5) * 0.3
            values = [r[f"diff_{figure}"] for r in rows if r["method"] == entry["method"] and f"diff_{figure}" in r]
            left.scatter([x] * len(values), values, s=10, color=f"C{k}", alpha=0.5,
                         label=("mean member" if k == 0 else "ensemble") if i == 0 else None)
            mean, low, high = (entry[f"diff_{figure}{s}"] for s in ("", "_low", "_high"))
            if low != float("-inf"):
                left.errorbar([x], [mean], yerr=[[mean - low], [high - mean]], fmt="o", color=f"C{k}", capsize=4)
    left.axhline(0, color="black", linewidth=0.8)
    left.set_xticks(range(len(others)), others, rotation=30, ha="right")
    left.set_ylabel(f"difference to {baseline} (points)")
    left.set_title("paired by seed, 95% t-interval")
    left.grid(alpha=0.3, axis="y")
    if differences:
        left.legend()
    for i, method in enumerate(methods):
        values = [100 * r["last_mean"] for r in rows if r["method"] == method]
        right.scatter([i] * len(values), values, s=10, color="C0", alpha=0.5)
        right.errorbar([i], [statistics.mean(values)], yerr=[statistics.stdev(values) if len(values) > 1 else 0.0],
                       fmt="_", color="C0", capsize=4, markersize=14)
    right.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    right.set_ylabel("mean member test accuracy (%)")
    right.set_title("last step, mean ± std over seeds")
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(PLOT_FILE, buffer.getvalue())
