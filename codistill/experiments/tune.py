"""`codistill tune`: Ray Tune over distillation settings, each trial a whole group of peers.

A trial is a Tune function trainable (the driver) that applies its sampled values to the
base config and runs the peers as one Ray Train `TorchTrainer` with `TuneReportCallback`
(the Train V2 way; `Tuner(trainer)` is deprecated). The workers report the objective at
every evaluation, so ASHA can stop a bad trial early. Each trial's run is named by its
trial id under `<storage_path>/<name>/runs/`, so a resumed trial resumes its run.

At the end: a table of trials (sampled values, objective, status, error) printed and
written to `trials.parquet`, the best config as a ready-to-run `best.yaml`, and
`tune.png` (objective against the sampled values).

A sweep re-run under its name resumes (Ray Tune's `Tuner.restore`): finished trials are kept,
not trained again, and trials that were running when the driver died resume their runs from
their checkpoints — only when the sweep asked for is the one stored in `sweep.yaml`.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from codistill.config import ExperimentConfig, dump_config, load_config, set_path, to_dict
from codistill.config.search_space import parse_distribution
from codistill.experiments.stored_sweep import SWEEP_FILE, as_stored, resume_or_start
from codistill.metrics import ACCURACY, Score
from codistill.storage import RunStorage, resolve_storage_path
from codistill.tracking.parents import track_sweep

logger = logging.getLogger(__name__)

TRIALS_FILE = "trials.parquet"
BEST_FILE = "best.yaml"
PLOT_FILE = "tune.png"
DRIVER_MEMORY = 256 * 2**20


def to_tune_domain(text: str, key: str):
    from ray import tune

    name, args = parse_distribution(text, key)
    if name == "uniform":
        return tune.uniform(*args)
    if name == "loguniform":
        return tune.loguniform(*args)
    if name == "quniform":
        return tune.quniform(*args)
    if name == "randint":
        return tune.randint(int(args[0]), int(args[1]))
    if name == "choice":
        return tune.choice(args[0])
    return tune.grid_search(args[0])


def trial_config(base: dict, params: dict, name: str, storage_path: str) -> ExperimentConfig:
    """The base config with a trial's sampled values applied (as values, not re-parsed text)."""
    data = copy.deepcopy(base)
    for key, value in {**params, "name": name, "ray.storage_path": storage_path}.items():
        set_path(data, key, value)
    data.pop("tune", None)
    return load_config(data)


def config_point(base: dict, keys) -> dict:
    """The config's own values of the searched keys (`peers.*.…` reads peer 0's): a search's
    starting point."""
    point = {}
    for key in keys:
        node = base
        for part in key.split("."):
            node = node[0 if part == "*" else int(part)] if isinstance(node, list) else node[part]
        point[key] = node
    return point


def _mean_of_runs(finals: list[dict]) -> dict:
    """The objectives a trial may be judged by (as the loop reports them), averaged over runs."""
    def objectives(final: dict) -> dict:
        peers = final["peer_accuracy"]
        bits = final.get("peer_bits")  # a language model's: bits per token too
        return {"step": final["step"], "mean_accuracy": sum(peers) / len(peers), "best_accuracy": max(peers),
                "ensemble_accuracy": final["ensemble_accuracy"], "churn": final["churn"],
                **({"mean_bits": sum(bits) / len(bits), "best_bits": min(bits), "ensemble_bits": final["ensemble_bits"]}
                   if bits and None not in bits and final.get("ensemble_bits") is not None else {}),
                **{f"member_{k}": v for k, v in final["members"].items()}}

    each = [objectives(f) for f in finals]
    return {k: sum(e[k] for e in each) / len(each) for k in each[0] if all(k in e for e in each)}


def run_trial(trial: dict) -> None:
    """The Tune trainable: one trial = one run of all peers (Ray Train or threads), or with
    `seeds_per_trial` > 1 one run per seed, judged by the mean of their final evaluations."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from codistill.engine.ray.registrations import adopt_registrations
    from codistill.engine.run import train_connected

    adopt_registrations(trial["registrations"])  # a trial's process imports codistill afresh
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(trial["base"], trial["params"], trial_id, trial["runs_path"])
    seeds = trial.get("seeds_per_trial", 1)
    if seeds > 1:
        finals = []
        for k in range(seeds):
            run_cfg = replace(cfg, seed=cfg.seed + k, name=f"{trial_id}-seed{cfg.seed + k}")
            finals.append(train_connected(run_cfg, trial["backend"]).final)
        ray.tune.report({**_mean_of_runs(finals), "seeds": seeds})
        return
    finished = _finished_run(cfg)
    if finished is not None:
        # Its run had finished when the sweep's driver died, before Tune saved the trial as done:
        # the run is not trained again (nothing would be), its last evaluation is the result.
        ray.tune.report({k: v for k, v in {**finished, **_mean_of_runs([finished])}.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return
    if trial["backend"] == "local":
        def report(step: int, metrics: dict) -> None:
            if "mean_accuracy" in metrics:  # an evaluation, not a progress tick
                ray.tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

        train_connected(cfg, "local", on_progress=report)
    else:
        train_connected(cfg, "ray", callbacks=[TuneReportCallback()])  # run_sweep checked the storage, once


def _finished_run(cfg: ExperimentConfig) -> dict | None:
    """The final evaluation of the run `cfg` names, if it has trained all its steps already."""
    from codistill.engine.checkpoint import checkpoint_folders
    from codistill.records import final_metrics, read_records

    storage = RunStorage(cfg.ray.storage_path, cfg.name)
    folders = checkpoint_folders(storage)
    if not folders or folders[-1][0] < cfg.train.steps:
        return None
    final = final_metrics(read_records(storage))
    return final if final.get("step") == cfg.train.steps else None


def _search_algorithm(search: str, objective: str, mode: str, seed: int, max_concurrent: int,
                      points: list[dict] | None = None):
    if search == "random":
        from ray.tune.search import BasicVariantGenerator

        # Each search carries its own concurrency bound: Tune ignores `max_concurrent_trials`
        # (with a warning) when it is given a generator, and would start every trial at once.
        return BasicVariantGenerator(random_state=seed, points_to_evaluate=points,  # the same trials on a re-run
                                     max_concurrent=max_concurrent)
    try:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401
    except ImportError:
        raise SystemExit("search: optuna needs Optuna: pip install 'codistill[tune]'") from None
    return ConcurrencyLimiter(OptunaSearch(metric=objective, mode=mode, points_to_evaluate=points),
                              max_concurrent=max_concurrent)


@dataclass
class SweepResult:
    table: pa.Table
    best_config: ExperimentConfig | None
    best_objective: float | None
    storage: RunStorage
    score: Score = ACCURACY
    """The objective's score: which way is better, and how it is shown (accuracy as %, bits as bits)."""

    @property
    def summary(self) -> str:
        rows = self.table.to_pylist()
        keys = [c for c in self.table.column_names if c.startswith("param:")]
        unit = "objective" + ("" if self.score is ACCURACY else f" ({self.score.column})")
        header = f"{'trial':<14}" + "".join(f"{k[6:]:>24}" for k in keys) + f"{unit:>12}  status"
        lines = [header]
        for row in rows:
            values = "".join(f"{_short(row[k]):>24}" for k in keys)
            objective = "—" if row["objective"] is None else self.score.shown(row["objective"], unit=False)
            status = row["status"] + (f" ({row['error']})" if row["error"] else "")
            lines.append(f"{row['trial_id']:<14}{values}{objective:>12}  {status}")
        return "\n".join(lines)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_sweep(cfg: ExperimentConfig, on_change: str = "refuse") -> SweepResult:
    """Run the sweep described by `cfg.tune` on the connected Ray cluster, or resume the one
    stored under its name (see the module's docstring; `on_change`: see `stored_sweep.resume_or_start`)."""
    from codistill.lease import RunLease
    from codistill.engine.ray.placement import check_shared_storage

    if cfg.tune is None or not cfg.tune.space:
        raise ValueError("the config has no `tune.space` to search")
    # Ctrl-C ends a sweep as it ends every command: interrupted, resumed by a re-run. Tune's own
    # handler would return from fit() instead, and the best of the trials finished so far would
    # pass for the sweep's result (a comparison took it as its tuning).
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    storage_path = resolve_storage_path(cfg.ray.storage_path)
    storage = RunStorage(storage_path, cfg.name)
    with RunLease(storage) as lease:  # one driver per sweep name (`sweep_lease.py`)
        check_shared_storage(storage_path)  # before any trial writes: every node must see the runs
        return _run_sweep(cfg, storage, on_change, lease)


def _run_sweep(cfg: ExperimentConfig, storage: RunStorage, on_change: str, lease) -> SweepResult:
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from codistill.engine.ray.registrations import user_registrations
    from codistill.experiments.sweep_lease import clear_dead_leases, retry_lease_refusals

    settings, storage_path = cfg.tune, storage.storage_path
    base = to_dict(replace(cfg, tune=None))
    base["ray"]["storage_path"] = storage_path
    objective, mode = settings.objective, settings.score.mode  # bits per token: the fewest wins
    evaluations = cfg.train.steps // cfg.train.eval_every + 1
    points = [{"params": config_point(base, settings.space)}] if settings.start_at_config else None
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=max(evaluations, settings.grace_period),
                               grace_period=settings.grace_period, reduction_factor=settings.reduction_factor)
                 if settings.scheduler == "asha" else FIFOScheduler())
    # The driver only waits on its Ray Train run, so it reserves memory, not a core: the trial's
    # peers reserve their own CPUs/GPUs through Ray Train's placement group, and `max_concurrent`
    # bounds how many peer groups are asked for at once.
    trainable = ray.tune.with_resources(run_trial, {"CPU": cfg.num_peers if settings.backend == "local" else 0,
                                                    "memory": DRIVER_MEMORY})
    param_space = {"base": base, "runs_path": storage.uri + "/runs", "registrations": user_registrations(),
                   "backend": settings.backend, "seeds_per_trial": settings.seeds_per_trial,
                   "params": {key: to_tune_domain(text, key) for key, text in settings.space.items()}}
    experiment = storage.uri
    if resume_or_start(cfg, storage, experiment, on_change, lease):
        logger.warning("resuming sweep %s: finished trials are kept, unfinished ones resume their runs", experiment)
        # Errored trials stay as they ended (Ray's default): a re-run is not a retry of a failure —
        # but a trial refused only because another process held its run failed nothing of its own.
        retry_lease_refusals(storage)
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False,
                                       param_space={**param_space, "base": as_stored(base, storage)})
        grid = tuner.fit()
        clear_dead_leases(RunStorage.at(storage.uri + "/runs"))
        return collect_results(grid, cfg, storage)
    storage.write_bytes(SWEEP_FILE, dump_config(cfg).encode())
    tuner = ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(metric=objective, mode=mode, num_samples=settings.num_samples,
                                        scheduler=scheduler,
                                        search_alg=_search_algorithm(settings.search, objective, mode, cfg.seed,
                                                                     settings.max_concurrent, points),
                                        # A trial's folder is its id, so results name their trial
                                        # even when the trial failed before reporting anything.
                                        trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=ray.tune.RunConfig(name=cfg.name, storage_path=storage_path, verbose=0),
    )
    grid = tuner.fit()
    return collect_results(grid, cfg, storage)


def collect_results(grid, cfg: ExperimentConfig, storage: RunStorage) -> SweepResult:
    objective, score = cfg.tune.objective, cfg.tune.score
    rows = []
    for result in grid:
        params = (result.config or {}).get("params", {})
        history = result.metrics_dataframe
        reported = history[objective].dropna().tolist() if history is not None and objective in history else []
        metrics = result.metrics or {}
        last_step = metrics.get("step")
        status = "ERROR" if result.error else ("TERMINATED" if last_step == cfg.train.steps else "STOPPED")
        rows.append({
            "trial_id": result.path.rstrip("/").rsplit("/", 1)[-1],
            **{f"param:{k}": v for k, v in params.items()},
            "objective": reported[-1] if reported else None,
            "best_objective": score.best(reported) if reported else None,
            "evaluations": len(reported),
            "last_step": last_step,
            "status": status,
            "error": _error_text(result.error),
        })
    rows.sort(key=lambda r: r["trial_id"])
    table = pa.Table.from_pylist(rows)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(TRIALS_FILE, buffer.getvalue())

    finished = [r for r in rows if r["status"] == "TERMINATED" and r["objective"] is not None]
    best_config, best_objective = None, None
    if finished:
        best = score.best(finished, key=lambda r: r["objective"])
        params = trial_params(best)
        base = to_dict(replace(cfg, tune=None))
        best_config = trial_config(base, params, f"{cfg.name}-best", cfg.ray.storage_path)
        best_objective = best["objective"]
        header = (f"# Best of sweep {cfg.name!r}: trial {best['trial_id']}, {objective} = {best_objective:.4f}\n"
                  f"# Sampled: {json.dumps(params)}\n# Reproduce with: codistill train best.yaml\n")
        storage.write_bytes(BEST_FILE, (header + yaml.safe_dump(to_dict(best_config), sort_keys=False)).encode())
    plot_sweep(table, objective, storage, score)
    track_sweep(cfg, storage, rows, {name: storage.read_bytes(name) for name in (TRIALS_FILE, BEST_FILE) if storage.exists(name)})
    return SweepResult(table, best_config, best_objective, storage, score)


def trial_params(row: dict) -> dict:
    """A trials-table row's sampled values, by config key (the `param:` columns)."""
    return {k[len("param:"):]: v for k, v in row.items() if k.startswith("param:")}


def _error_text(error) -> str | None:
    if error is None:
        return None
    text = str(getattr(error, "cause", None) or error).strip().splitlines()
    # The last line of a remote traceback is the error itself.
    return text[-1][:300] if text else type(error).__name__


def plot_sweep(table: pa.Table, objective: str, storage: RunStorage, score: Score = ACCURACY) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table.to_pylist() if r["objective"] is not None]
    keys = [c for c in table.column_names if c.startswith("param:")
            and all(isinstance(r[c], (int, float)) for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.5 * max(1, len(keys)), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        finished = [r for r in rows if r["status"] == "TERMINATED"]
        stopped = [r for r in rows if r["status"] != "TERMINATED"]
        ax.scatter([r[key] for r in finished], [score.scale * r["objective"] for r in finished], label="finished")
        ax.scatter([r[key] for r in stopped], [score.scale * r["objective"] for r in stopped], marker="x", label="stopped early")
        if "lr" in key or "temperature" in key:
            ax.set_xscale("log")
        ax.set_xlabel(key[len("param:"):])
        ax.set_ylabel(f"{objective} ({'%' if score is ACCURACY else score.label})")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(PLOT_FILE, buffer.getvalue())
