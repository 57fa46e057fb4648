"""`codistill compare`: several methods × seeds under one recipe, reported the way the field
argues about them.

Every cell (method, seed) is an ordinary run named `<name>.<method>.seed<k>` under the
config's storage path, so a re-run skips the finished cells and resumes an interrupted one.
From each run's records come the group's figures — its members are the peers, or the
branches of a method that trains one network — first member, best member, mean member,
ensemble and churn, at the last evaluation and (separately labelled) at the evaluation with
the best mean member. Over seeds: mean ± sample std. Written beside the runs:
`<name>/compare.parquet` (one row per cell), `compare.md` and `compare.png`.

`--tune N` gives every method, the baseline included, the same budget first: N Ray Tune
trials (random search, seeded; every trial runs to the end) over its learning rate and
schedule and — where the method has them — its temperature and weight, trained on the
training set less a held-out validation fifth and judged by the mean member's accuracy
there. The seeds then run with each method's own best values on the whole training set and
are tested on the test set, which tuning never saw.
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

from codistill.config import ExperimentConfig, build_dataclass, load_config, set_path, to_dict
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
    """`name` or `name:key=value,key=value` (values are YAML: `branches=3`, `variant=mean`)."""
    name, _, rest = text.partition(":")
    registered = ", ".join(METHOD_CONFIGS.names())
    if name not in METHOD_CONFIGS:
        raise ConfigError("--methods", f"{text!r}: no method {name!r}; registered methods: {registered}")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError("--methods", f"{text!r}: settings are key=value pairs after `name:`, e.g. kdcl:variant=mean")
        settings[key.strip()] = yaml.safe_load(value)
    return MethodSpec(text, name, settings)


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
# Tuning


def tune_method(spec: MethodSpec, base: dict, name: str, trials: int, storage: RunStorage) -> dict:
    """The method's best values after `trials` trials on the validation split (kept in
    `tuned/<method>.json`: a re-run does not tune again)."""
    saved = f"tuned/{spec.slug}.json"
    if storage.exists(saved):
        return json.loads(storage.read_bytes(saved))["params"]
    from codistill.experiments.tune import run_sweep

    data = cell_data(base, spec, {})
    data["name"] = f"{name}.{spec.slug}.tune"
    data["data"]["validation"] = VALIDATION
    data["tune"] = {"space": search_space(spec, base), "objective": "member_mean_accuracy", "num_samples": trials,
                    "max_concurrent": 1, "scheduler": "fifo", "search": "random", "backend": "local"}
    result = run_sweep(load_config(data))
    if result.best_config is None:
        errors = [r["error"] for r in result.table.to_pylist() if r["error"]]
        raise RunError(f"tuning {spec.label} finished no trial" + (f": {errors[0]}" if errors else ""))
    rows = result.table.to_pylist()
    best = max((r for r in rows if r["status"] == "TERMINATED" and r["objective"] is not None),
               key=lambda r: r["objective"])
    params = {k[len("param:"):]: v for k, v in best.items() if k.startswith("param:")}
    storage.write_bytes(saved, json.dumps({"params": params, "validation_objective": best["objective"],
                                           "trials": len(rows)}, indent=1).encode())
    return params


# ---------------------------------------------------------------------------------------------
# The comparison


@dataclass
class Comparison:
    table: pa.Table
    markdown: str
    storage: RunStorage


def compare(cfg: ExperimentConfig, methods: list[str], seeds: list[int], backend: str = "local",
            tune_trials: int = 0, log=print) -> Comparison:
    from codistill.engine.run import train_connected

    specs = [parse_method(m) for m in methods]
    if len({s.slug for s in specs}) != len(specs):
        raise ConfigError("--methods", "a method is listed twice")
    if not seeds:
        raise ConfigError("--seeds", "name at least one seed")
    base = to_dict(dataclasses.replace(cfg, tune=None))
    storage_path = resolve_storage_path(cfg.ray.storage_path)
    base["ray"]["storage_path"] = storage_path
    storage = RunStorage(storage_path, cfg.name)
    same_models = len({p["model"] for p in base["peers"]}) == 1
    rows = []
    for spec in specs:
        probe = cell_data(base, spec, {})
        one_network = _one_network(probe)
        if one_network and not same_models:
            log(f"{spec.label}: n/a — one network of branches needs peers of one model")
            continue
        load_config({**probe, "name": "probe"})  # a bad setting is said before anything runs
        tuned = tune_method(spec, base, cfg.name, tune_trials, storage) if tune_trials else {}
        if tuned:
            log(f"{spec.label}: tuned {json.dumps(tuned)}")
        for seed in seeds:
            data = cell_data(base, spec, tuned)
            data.update(seed=seed, name=f"{cfg.name}.{spec.slug}.seed{seed}")
            cell = load_config(data)
            run_storage = RunStorage(storage_path, cell.name)
            figures = run_figures(run_storage, cell.train.steps)
            if figures is None:
                train_connected(cell, backend)
                figures = run_figures(run_storage, cell.train.steps)
                if figures is None:
                    raise RunError(f"{cell.name} ended without its final evaluation")
            else:
                log(f"{spec.label} seed {seed}: finished before, not rerun")
            rows.append({"method": spec.label, "seed": seed, "run": cell.name, "one_network": one_network,
                         "members": len(cell.peers) if not one_network else cell.method.branches,
                         "tuned": json.dumps(tuned), **figures})
            log(f"{spec.label} seed {seed}: mean member {100 * figures['last_mean']:.2f}%, "
                f"ensemble {100 * figures['last_ensemble']:.2f}%")
    table = pa.Table.from_pylist(rows)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(TABLE_FILE, buffer.getvalue())
    markdown = markdown_table(rows, cfg, tune_trials)
    storage.write_bytes(MARKDOWN_FILE, markdown.encode())
    plot_comparison(rows, storage)
    return Comparison(table, markdown, storage)


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


def markdown_table(rows: list[dict], cfg: ExperimentConfig, tune_trials: int) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    peers = " + ".join(p.model for p in cfg.peers)
    lines = [f"Peers {peers}; {cfg.train.steps} steps; seeds {', '.join(map(str, seeds))}; mean ± std over seeds, "
             "test accuracy (%) of the group's members (peers, or branches of one network) and churn (%)."
             + (f" Each method tuned with {tune_trials} trials on a validation split." if tune_trials else "")]
    for prefix, title in (("last", "at the last step"), ("bestevaluation", "at the best evaluation (by mean member; labelled: not a last-step figure)")):
        lines += ["", f"**{title}**", "",
                  "| method | members | " + ("tuned | " if tune_trials else "") + "first | best | mean | ensemble | churn |",
                  "|---|---|" + ("---|" if tune_trials else "") + "---|---|---|---|---|"]
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            tuned = f"{_tuned_text(mine[0]['tuned'])} | " if tune_trials else ""
            cells = " | ".join(mean_std([r[f"{prefix}_{k}"] for r in mine]) for k in FIGURES)
            lines.append(f"| {method} | {mine[0]['members']} | {tuned}{cells} |")
    if any("bits_mean" in r for r in rows):
        lines += ["", "**bits per token at the last step** (test; lower is better) and bytes a peer sent per round", "",
                  "| method | first | best | mean | ensemble | bytes / round |", "|---|---|---|---|---|---|"]
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            cells = " | ".join(mean_std([r[f"bits_{k}"] for r in mine], scale=1, digits=3) for k in ("first", "best", "mean", "ensemble"))
            sent = [r["bytes_per_round"] for r in mine if r.get("bytes_per_round")]
            lines.append(f"| {method} | {cells} | {f'{statistics.mean(sent):,.0f}' if sent else '—'} |")
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[dict], storage: RunStorage) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(methods) + 2), 3.8))
    for i, method in enumerate(methods):
        for k, figure in enumerate(("last_mean", "last_ensemble")):
            values = [100 * r[figure] for r in rows if r["method"] == method]
            x = i + (k - 0.5) * 0.3
            ax.scatter([x] * len(values), values, s=12, color=f"C{k}", alpha=0.6,
                       label=("mean member" if k == 0 else "ensemble") if i == 0 else None)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            ax.errorbar([x], [statistics.mean(values)], yerr=[spread], fmt="_", color=f"C{k}", capsize=4,
                        markersize=14)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_ylabel("test accuracy at the last step (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(PLOT_FILE, buffer.getvalue())


