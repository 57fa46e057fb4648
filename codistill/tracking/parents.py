"""A comparison or a tune sweep as one parent tracker run with a child per cell or trial
(`docs/tracking.md`).

The parent is opened by the command that runs the cells (`codistill compare`), on the driver,
and stays the current parent while the cells train in that process: a cell's `RunTracker`
asks `current()` and opens its tracker runs as the parent's children — MLflow's standard
nesting (the `mlflow.parentRunId` tag), a TensorBoard folder per child under the parent's log
dir (`<compare>/tensorboard/<cell>/`), a W&B `group` named after the comparison. A cell that is
reused from the cache does not train, so it opens no tracker run and is logged nothing again.
A tune sweep's trials train in Ray workers, out of the driver's reach: the driver logs each
finished trial as a child from the trials table (`child`, `track_sweep`), once.

The parent's own tracker runs are kept like a run's (`<compare>/tracking/state.json`), so a
re-run of the comparison reopens the same parent; its results (the paired differences as
metrics, `compare.md` as an artifact) are sent only when they differ from what was sent."""

from __future__ import annotations

import contextvars
import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from codistill.config import ExperimentConfig, ConfigError
from codistill.errors import first_line
from codistill.storage import RunStorage

STATE_FILE = "tracking/state.json"


@dataclass(frozen=True)
class Parent:
    """What a child needs of its parent: its name (W&B's group), the folder its TensorBoard
    children go under (None: no TensorBoard parent), and MLflow's parent run id."""

    name: str
    tensorboard: str | None = None
    mlflow_run_id: str | None = None
    wandb_group: str | None = None


_CURRENT: contextvars.ContextVar[Parent | None] = contextvars.ContextVar("codistill_tracker_parent", default=None)


def current() -> Parent | None:
    """The parent the tracker runs opened now are children of (None: they stand alone)."""
    return _CURRENT.get()


def metric_name(text: str) -> str:
    """`text` as a metric key every tracker takes (MLflow refuses `=` and `,`: `kdcl:variant=mean`)."""
    return re.sub(r"[^\w.\-/]", "_", text)


def difference_metrics(differences: list[dict]) -> dict[str, float]:
    """The paired differences of a comparison (`paired.paired_differences`) as the parent's
    metrics: `{method}/diff_mean`, `…_low`, `…_high`, `{method}/diff_wins_mean`, … (an interval
    of one seed is infinite: left out)."""
    metrics = {}
    for entry in differences:
        for key, value in entry.items():
            if key.startswith(entry.get("prefix", "diff")) and isinstance(value, (int, float)) and math.isfinite(value):
                metrics[f"{metric_name(entry['method'])}/{key}"] = float(value)
    return metrics


def target_metrics(target: float, entries: list[dict], steps: dict[str, list[int]]) -> dict[str, float]:
    """A comparison's steps to its target (`speed.paired_steps`) as the parent's metrics: `target`,
    `{method}/target_reached` (seeds), `…/target_steps` (their mean step), and against the
    baseline `…/target_steps_diff` with `_low`, `_high` and `…/target_steps_ratio` with its own
    (a one-seed interval is infinite or unset: left out). `steps`: each method's steps to the target
    over the seeds that reached it."""
    metrics = {"target": float(target)}
    for entry in entries:
        name = metric_name(entry["method"])
        metrics[f"{name}/target_reached"] = float(entry["reached"])
        if steps.get(entry["method"]):
            metrics[f"{name}/target_steps"] = sum(steps[entry["method"]]) / len(steps[entry["method"]])
        for key, value in (("diff", "diff"), ("diff_low", "low"), ("diff_high", "high"), ("ratio", "ratio"),
                           ("ratio_low", "ratio_low"), ("ratio_high", "ratio_high")):
            if isinstance(entry.get(value), (int, float)) and math.isfinite(entry[value]):
                metrics[f"{name}/target_steps_{key}"] = float(entry[value])
    return metrics


class ParentRun:
    """The parent of a comparison's tracker runs: `open`, run the children inside `with`, then
    `finish` with the results; an exception inside `with` marks it FAILED (KILLED on Ctrl-C)."""

    def __init__(self, cfg: ExperimentConfig, storage: RunStorage, kind: str):
        from codistill.tracking.writers import MlflowWriter, TensorBoardWriter, WandbWriter

        self.storage, self.kind, self.state, self.token = storage, kind, {}, None
        tracking, self.writers = cfg.tracking, []
        folder = storage.run_dir if isinstance(storage.fs, pafs.LocalFileSystem) else None
        above = current()  # a comparison's tuning sweep: a child of the comparison, its trials under it
        if tracking.tensorboard and folder is not None:  # no local folder: the cells say so themselves
            self.writers.append(TensorBoardWriter(os.path.join(above.tensorboard, cfg.name) if above and above.tensorboard
                                                  else os.path.join(folder, "tensorboard")))
        if tracking.mlflow:
            nested = {"mlflow.parentRunId": above.mlflow_run_id} if above and above.mlflow_run_id else {}
            self.writers.append(MlflowWriter(tracking.mlflow.tracking_uri, tracking.mlflow.experiment, cfg.name,
                                             tags={f"codistill.{kind}": cfg.name, **nested}))
        if tracking.wandb:
            where = folder or os.path.join(tempfile.gettempdir(), "codistill-wandb", cfg.name)
            self.writers.append(WandbWriter(tracking.wandb.project, tracking.wandb.entity, tracking.wandb.mode, where,
                                            cfg.name, group=cfg.name))
        self.name = cfg.name

    @classmethod
    def open(cls, cfg: ExperimentConfig, storage: RunStorage, kind: str = "compare") -> "ParentRun":
        parent = cls(cfg, storage, kind)
        if not parent.writers:
            return parent
        parent.state = json.loads(storage.read_bytes(STATE_FILE)) if storage.exists(STATE_FILE) else {}
        for writer in parent.writers:
            writer.check()
        for writer in parent.writers:
            try:
                parent.state[writer.name] = {**parent.state.get(writer.name, {}),
                                             **writer.open(parent.state.get(writer.name))}
            except ConfigError:
                parent.close("FAILED")
                raise
            except Exception as err:  # noqa: BLE001 — a server that does not answer: one line
                parent.close("FAILED")
                raise ConfigError(f"tracking.{writer.name}", f"cannot open the {writer.name} run of the {kind}: "
                                  f"{type(err).__name__}: {first_line(err)}") from None
        parent.storage.write_bytes(STATE_FILE, json.dumps(parent.state, indent=1).encode())
        return parent

    def as_parent(self) -> Parent:
        ids = {w.name: w for w in self.writers}
        return Parent(self.name, ids["tensorboard"].folder if "tensorboard" in ids else None,
                      ids["mlflow"].run_id if "mlflow" in ids else None, self.name if "wandb" in ids else None)

    def __enter__(self) -> "ParentRun":
        if self.writers:
            self.token = _CURRENT.set(self.as_parent())
        return self

    def __exit__(self, kind, err, trace) -> None:
        if self.token is not None:
            _CURRENT.reset(self.token)
            self.token = None
        if kind is not None:
            self.close("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")

    def child(self, name: str, params: dict[str, str], metrics: dict[str, float]) -> None:
        """A child that is only a result (a tune trial, run in a Ray worker: the driver logs it
        from the trials table): its sampled values as parameters, its figures as metrics at
        step 0. Logged once: a child already logged (kept in the state file) is not again."""
        for writer in self.writers:
            done = self.state[writer.name].setdefault("children", [])
            if name in done:
                continue
            if writer.name == "mlflow":
                from mlflow.entities import Metric, Param

                experiment = writer.client.get_run(writer.run_id).info.experiment_id
                run_id = writer.client.create_run(experiment, run_name=name, tags={
                    "mlflow.parentRunId": writer.run_id, f"codistill.{self.kind}": self.name}).info.run_id
                now = int(time.time() * 1000)
                writer.client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                                        params=[Param(metric_name(k), v[:6000]) for k, v in params.items()])
                writer.client.set_terminated(run_id, "FINISHED")
            elif writer.name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                with SummaryWriter(os.path.join(writer.folder, name)) as events:
                    for key, value in metrics.items():
                        events.add_scalar(key, value, global_step=0)
                    events.add_text("params", "\n".join(f"{k} = {v}" for k, v in params.items()), global_step=0)
            else:
                import wandb

                run = wandb.init(project=writer.project, entity=writer.entity, mode=writer.mode, dir=writer.folder,
                                 name=name, group=self.name, reinit="create_new", config=params,
                                 settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                                         disable_git=True, save_code=False))
                run.log(metrics, step=0)
                run.finish()
            done.append(name)
        if self.writers:
            self.storage.write_bytes(STATE_FILE, json.dumps(self.state, indent=1).encode())

    def finish(self, metrics: dict[str, float], files: dict[str, bytes]) -> None:
        """The results as the parent's metrics (at step 0) and `files` as its artifacts — sent
        only when they are not what was sent before — and the parent marked finished."""
        digest = hashlib.sha256(json.dumps([metrics, {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}],
                                           sort_keys=True).encode()).hexdigest()
        with tempfile.TemporaryDirectory() as folder:
            paths = []
            for name, data in files.items():
                paths.append(os.path.join(folder, name))
                with open(paths[-1], "wb") as f:
                    f.write(data)
            for writer in self.writers:
                if self.state[writer.name].get("results") != digest:
                    writer.send([(0, metrics)])
                    writer.artifacts(paths)
                    self.state[writer.name]["results"] = digest
        if self.writers:
            self.storage.write_bytes(STATE_FILE, json.dumps(self.state, indent=1).encode())
        self.close("FINISHED")

    def close(self, status: str) -> None:
        for writer in self.writers:
            try:
                writer.close(status)
            except Exception:  # noqa: BLE001 — the comparison's own outcome is what to report
                pass
        self.writers = []


def track_sweep(cfg: ExperimentConfig, storage: RunStorage, rows: list[dict], files: dict[str, bytes]) -> None:
    """A tune sweep's parent tracker run (none when `cfg.tracking` names no tracker): a child per
    trial of the trials table `rows` (its `param:` values, its objective), the best objective as
    the parent's metric and `files` (trials.parquet, best.yaml) as its artifacts."""
    with ParentRun.open(cfg, storage, "tune") as parent:
        if not parent.writers:
            return
        for row in rows:
            figures = {k: float(row[k]) for k in ("objective", "best_objective") if row.get(k) is not None}
            parent.child(row["trial_id"], {k[len("param:"):]: str(v) for k, v in row.items() if k.startswith("param:")},
                         {**figures, "last_step": float(row["last_step"] or 0)})
        done = [row["objective"] for row in rows if row["status"] == "TERMINATED" and row["objective"] is not None]
        parent.finish({"best_objective": cfg.tune.score.best(done)} if done else {}, files)
