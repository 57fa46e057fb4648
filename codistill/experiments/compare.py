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

import dataclasses
import io
import json
import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from codistill.config import ExperimentConfig, first_difference, load_config, to_dict
from codistill.config.runs_of_runs import objective_score
from codistill.errors import ConfigError, RunError
from codistill.experiments import speed
from codistill.experiments.cells import (DATA_PARALLEL, TUNE_SEEDS, MethodSpec, cell_config, cell_data, cell_name,
                                         cell_recipe, trains_one_network, parse_method, refuse_or_forget, run_figures, search_space,
                                         stored_cell_difference, what_it_trains)
from codistill.experiments.compare_report import MARKDOWN_FILE, PLOT_FILE, markdown_table, plot_comparison
from codistill.experiments.paired import paired_differences
from codistill.metrics import Score
from codistill.storage import RunStorage, resolve_storage_path
from codistill.tracking.parents import ParentRun, difference_metrics, target_metrics

TABLE_FILE = "compare.parquet"
VALIDATION = 0.2


# ---------------------------------------------------------------------------------------------
# Tuning: the same budget for every method, starting at its recipe's (the paper's) setting


def tuning_data(spec: MethodSpec, base: dict, name: str, trials: int) -> dict:
    from codistill.data import DATASETS

    recipe = cell_recipe(base, spec)  # once: the data_parallel arm's transform is not run twice
    data = cell_data(base, spec, {}, recipe)
    data["name"] = f"{name}.{spec.slug}.tune"
    data["data"]["validation"] = VALIDATION
    data["data"]["test_examples"] = 0  # the validation split replaces the test set
    # A trial is judged by its last evaluation (FIFO: nothing stops a trial early), so it is
    # evaluated once, at its end. A fifth of a 6M-example training set is 1.2M validation
    # examples: evaluated every 50 steps, that was 20× the forward passes of the training itself.
    data["train"]["eval_every"] = data["train"]["steps"]
    # Judged by the task's score, as the tables report it: the members' mean accuracy, or a language
    # model's members' mean bits per token (the fewest wins). A classifier's tuning is what it was.
    score = DATASETS.get(base["data"]["name"], "data.name").task.score
    data["tune"] = {"space": search_space(spec, recipe), "objective": f"member_mean_{score.name}", "num_samples": trials,
                    "max_concurrent": 1, "scheduler": "fifo", "search": "random", "backend": "local",
                    "start_at_config": True, "seeds_per_trial": TUNE_SEEDS}
    return to_dict(load_config(data))


def saved_tuning(spec: MethodSpec, asked: dict, storage: RunStorage, fresh: bool, log) -> dict | None:
    """The saved tuning of `spec`, if it was made by exactly the tuning asked for."""
    saved = f"tuned/{spec.slug}.json"
    if not storage.exists(saved):
        return None
    from codistill.engine.run import stored_as_of_today

    record = json.loads(storage.read_bytes(saved))
    # Read by today's schema, as a stored cell is: a setting added since takes its default.
    difference = first_difference(what_it_trains(asked), what_it_trains(stored_as_of_today(record.get("config", {}))))
    if difference is None:
        return record
    refuse_or_forget(f"the saved tuning of {spec.label}", None, f"{storage.uri}/{saved}", difference, fresh, log)
    storage.delete(saved)
    return None


def tuning_score(tuning: dict) -> Score:
    """The score a tuning (its config, or its saved record) judged its trials by."""
    return objective_score(tuning.get("config", tuning)["tune"]["objective"])


def tuned_text(tuning: dict) -> str:
    """What a tuning chose and bought, in the score it was judged by (accuracy as %, bits as bits)."""
    score = tuning_score(tuning)
    default = tuning["default_objective"]
    return (f"tuned {json.dumps(tuning['params'])} (validation {score.shown(tuning['validation_objective'])}"
            + (f"; its recipe's setting {score.shown(default)})" if default is not None else ")"))


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
    best = tuning_score(asked).best(finished, key=lambda r: r["objective"])
    default_params = config_point(asked, asked["tune"]["space"])
    default = next((r for r in finished if trial_params(r) == default_params), None)
    record = {"params": trial_params(best), "validation_objective": best["objective"], "default_params": default_params,
              "default_objective": default["objective"] if default else None, "trials": len(rows),
              "seeds_per_trial": asked["tune"]["seeds_per_trial"], "config": asked}
    storage.write_bytes(f"tuned/{spec.slug}.json", json.dumps(record, indent=1).encode())
    return record


# ---------------------------------------------------------------------------------------------
# The comparison


def check_target(target: float, data_name: str) -> None:
    """`--target` in the unit the data's task scores in: an accuracy as a fraction in (0, 1], or
    (a score where fewer is better: bits per token) a number above 0; finite either way."""
    from codistill.data import DATASETS

    score = DATASETS.get(data_name, "data.name").task.score
    bounded = not score.lower_is_better  # accuracy cannot pass 1; bits have no upper bound
    allowed = (f"{score.label}, a finite number above 0" if not bounded
               else f"{score.label} as a fraction in (0, 1], e.g. 0.9 for 90%")
    if not (math.isfinite(target) and target > 0 and (not bounded or target <= 1)):
        raise ConfigError("--target", f"got {target:g}; data set {data_name!r} is scored in "
                                      f"{score.label}: the target is {allowed}")


def retraining_figures(plan: list, seeds: list[int], base: dict, name: str, baseline: str, log) -> list[dict]:
    """Churn between retrainings (`retraining.py`) of every arm whose members are separate
    models, from each cell's final checkpoint — for classifiers (a language model's token-level
    disagreement is not Anil et al.'s figure) and two seeds or more."""
    from codistill.data import DATASETS, load_data
    from codistill.experiments.retraining import final_predictions, retraining_churn

    if len(seeds) < 2 or DATASETS.get(base["data"]["name"], "data.name").task.score.lower_is_better:
        return []
    storage_path = base["ray"]["storage_path"]
    loaded: dict[str, object] = {}
    predictions: dict[str, dict[int, object]] = {}
    for spec, one_network, _, tuning in plan:
        if one_network:
            continue
        for seed in seeds:
            cell = cell_config(base, spec, tuning, seed, name)
            key = json.dumps(to_dict(cell)["data"], sort_keys=True)
            if key not in loaded:
                loaded[key] = load_data(cell.data)
            try:
                found = final_predictions(cell, RunStorage(storage_path, cell.name), loaded[key])
            except FileNotFoundError as err:  # e.g. a cell whose checkpoints were deleted
                log(f"{spec.label} seed {seed}: no churn between retrainings ({err})")
                continue
            predictions.setdefault(spec.label, {})[seed] = found
    return retraining_churn(predictions, baseline)


@dataclass
class Comparison:
    table: pa.Table
    markdown: str
    storage: RunStorage
    differences: list[dict]


def compare(cfg: ExperimentConfig, methods: list[str], seeds: list[int], backend: str = "local",
            tune_trials: int = 0, log=print, baseline: str | None = None, fresh: bool = False,
            target: float | None = None) -> Comparison:
    """`target`: the quality whose steps-to-reach are reported (accuracy as a fraction, or bits
    per token); default the `data_parallel` arm's own final quality when it is compared."""
    from codistill.engine.run import CONFIG_FILE, train_connected

    specs = [parse_method(m) for m in methods]
    if len({s.slug for s in specs}) != len(specs):
        raise ConfigError("--methods", "a method is listed twice")
    if not seeds:
        raise ConfigError("--seeds", "name at least one seed")
    baseline = baseline or specs[0].label
    if baseline not in [s.label for s in specs]:
        raise ConfigError("--baseline", f"{baseline!r} is not among --methods: {', '.join(s.label for s in specs)}")
    if target is not None:
        check_target(target, cfg.data.name)
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
        one_network = trains_one_network(probe)
        if one_network and not same_models:
            log(f"{spec.label}: n/a — one network of branches needs peers of one model")
            continue
        load_config({**probe, "name": "probe"})  # a bad setting is said before anything runs
        asked = tuning_data(spec, base, cfg.name, tune_trials) if tune_trials else None
        tuning = saved_tuning(spec, asked, storage, fresh, log) if asked else None
        plan.append((spec, one_network, asked, tuning))
        for seed in seeds:
            run_storage = RunStorage(storage_path, cell_name(cfg.name, spec, seed))
            if asked and tuning is None:  # to be tuned: a stored cell cannot be from this tuning
                if run_storage.exists(CONFIG_FILE):
                    refuse_or_forget(f"cell {spec.label} seed {seed}", run_storage, "", (
                        "tuned values", "(tuned by this command)", "(from a tuning that is not saved)"), fresh, log)
                continue
            cell = cell_config(base, spec, tuning, seed, cfg.name)
            difference = stored_cell_difference(cell, run_storage)
            if difference and difference[0] == "train.steps" and isinstance(difference[2], int):
                # Only a cell that never finished the steps it was started with may go on to the steps
                # asked (where its schedule allows: train checks). A finished cell extended would not
                # be the cell asked for: resuming inside a round is not an uninterrupted run.
                if run_figures(run_storage, difference[2]) is None:
                    continue
                if not fresh:
                    raise ConfigError("train.steps", f"cell {spec.label} seed {seed} in {run_storage.uri} finished "
                                      f"its {difference[2]} steps; this command asks {cell.train.steps}, and a finished "
                                      "cell is never extended (it would not be what an uninterrupted run of that many "
                                      "steps gives); nothing was run. Use another `name` (--set name=…) to keep both, "
                                      "or --fresh to run the cells again")
            if difference:
                refuse_or_forget(f"cell {spec.label} seed {seed}", run_storage, "", difference, fresh, log)

    # One parent tracker run for the comparison, a child per cell trained now (tracking/parents.py).
    with ParentRun.open(cfg, storage, "compare") as parent:
        rows = []
        for spec, one_network, asked, tuning in plan:
            if asked and tuning is None:
                tuning = tune_method(spec, asked, storage)
            if tuning:
                log(f"{spec.label}: {tuned_text(tuning)}")
            for seed in seeds:
                cell = cell_config(base, spec, tuning, seed, cfg.name)
                run_storage = RunStorage(storage_path, cell.name)
                figures = run_figures(run_storage, cell.train.steps, cell)
                if figures is None:
                    train_connected(cell, backend)
                    figures = run_figures(run_storage, cell.train.steps, cell)
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
        source = "--target"
        if target is None and DATA_PARALLEL in [s.name for s in specs]:
            arm = next(s.label for s in specs if s.name == DATA_PARALLEL)
            target, source = speed.default_target(rows, arm), f"{arm}'s own final quality, the mean over its seeds"
        reaching = None  # (where the target came from, the target)
        if target is not None:
            speed.reach(rows, target)
            reaching = (source, target)
        # Every column any row has (from_pylist reads the first row's keys only: a codistillation
        # row's bytes per round would vanish behind an independent first row).
        columns = list(dict.fromkeys(k for r in rows for k in r))
        table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows])
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes(TABLE_FILE, buffer.getvalue())
        retrained = retraining_figures(plan, seeds, base, cfg.name, baseline, log)
        markdown = markdown_table(rows, cfg, tune_trials, differences, baseline, reaching, retrained)
        storage.write_bytes(MARKDOWN_FILE, markdown.encode())
        plot_comparison(rows, differences, baseline, storage, target)
        metrics = difference_metrics(differences)
        if reaching:  # the steps-to-target table's figures too, as the parent's metrics
            reached = {m: [r["target_step"] for r in rows if r["method"] == m and r["target_step"] is not None]
                       for m in dict.fromkeys(r["method"] for r in rows)}
            metrics.update(target_metrics(target, speed.paired_steps(rows, baseline), reached))
        parent.finish(metrics, {MARKDOWN_FILE: markdown.encode(),
                                **({PLOT_FILE: storage.read_bytes(PLOT_FILE)} if storage.exists(PLOT_FILE) else {})})
    return Comparison(table, markdown, storage, differences)


