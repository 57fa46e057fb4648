"""One writer per tracker: how a run's points reach TensorBoard, MLflow and W&B, and how each
continues the tracker run it opened before (`RunTracker` in `__init__.py` decides what to send).

Every writer has the same verbs: `open(kept)` continues the tracker run `kept` describes (what
the run folder's `tracking/state.json` holds for this tracker; None: a new one) and returns what
to keep for the next open; `held` is the last step the tracker already holds, asked of the
tracker itself where it can say (a step sent after the state file was last written is not sent
twice); `send` and `artifacts`; `close(status)`. A tracker's package is imported only here, when
its writer opens, so a run that tracks nothing never imports one."""

from __future__ import annotations

import importlib.util
import os
import time
import uuid

from codistill.errors import ConfigError

EXTRA = "pip install 'codistill[track]'"
MARKER = "peer0/loss"  # a metric every step of every run has: what MLflow is asked for its last step


class Writer:
    name: str
    package: tuple[str, str]  # (module, the pip package that brings it)
    held: int = 0

    def check(self) -> None:
        """One line naming the extra when this tracker's package is not installed: asked of every
        writer before any opens, so a missing package opens no tracker run elsewhere. Found, not
        imported: the run's own process asks, and only the sender process needs the package."""
        module, package = self.package
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module without a spec
            found = False
        if not found:
            raise ConfigError(f"tracking.{self.name}", f"is on, but the {package} package is not installed: {EXTRA} "
                              f"(or pip install {package})")

    def open(self, kept: dict | None) -> dict:
        raise NotImplementedError

    def params(self, params: dict[str, str]) -> None:
        """The resolved config, flattened (`peers.0.optimizer.lr`)."""
        raise NotImplementedError

    def send(self, points: list[tuple[int, dict[str, float]]]) -> None:
        raise NotImplementedError

    def artifacts(self, paths: list[str]) -> None:
        pass

    def notes(self, notes: dict[str, str]) -> None:
        """Text about the run as a whole, once at its end (`codistill.export.peer0`: the checkpoint
        `codistill export` writes peer 0 from): tags where the tracker has them."""

    def close(self, status: str) -> None:
        pass


class TensorBoardWriter(Writer):
    """Event files in `folder` (the run folder's `tensorboard/`). A reopened writer starts a new
    event file whose purge step is the first step not yet recorded as sent: TensorBoard's reader
    then drops whatever an earlier file holds from that step on, so an event written after the
    last state file never shows twice."""

    name, package = "tensorboard", ("tensorboard", "tensorboard")

    def __init__(self, folder: str):
        self.folder, self.writer = folder, None

    def open(self, kept):
        from torch.utils.tensorboard import SummaryWriter

        self.held = int((kept or {}).get("sent", 0))
        self.writer = SummaryWriter(self.folder, purge_step=self.held + 1 if kept else None, flush_secs=30)
        return {}

    def send(self, points):
        for step, metrics in points:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def _table(self, tag: str, column: str, values: dict[str, str]) -> None:
        """`values` as one markdown table (TensorBoard's Text tab), at step 0."""
        rows = "\n".join(f"| {k} | {v} |" for k, v in values.items())
        self.writer.add_text(tag, f"| {column} | value |\n|---|---|\n" + rows, global_step=0)

    def params(self, params: dict[str, str]) -> None:
        self._table("config", "setting", params)  # the resolved config as one text summary

    def notes(self, notes):
        self._table("notes", "note", notes)  # beside the config table: TensorBoard has no tags
        self.writer.flush()

    def close(self, status):
        if self.writer is not None:
            self.writer.close()


class MlflowWriter(Writer):
    """One MLflow run under `experiment`, continued by its run id; `held` is the last step of
    MARKER the server holds, so steps it has are never logged again."""

    name, package = "mlflow", ("mlflow", "mlflow-skinny")
    BATCH = 1000  # MLflow's limit of metrics in one log_batch (and 100 parameters)

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str, tags: dict | None = None):
        # tags: a child's `mlflow.parentRunId` (MLflow's own nesting, `parents.py`), a parent's kind
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.tags = {"codistill.run": run_name, **(tags or {})}
        self.client = self.run_id = None

    def open(self, kept):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.tracking_uri)
        if kept and kept.get("run_id"):
            self.run_id = kept["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, MARKER)
            self.held = max([int(kept.get("sent", 0)), *(m.step for m in history)])
        else:
            found = self.client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_name,
                                                 tags=self.tags).info.run_id
        return {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri}

    def params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        # Parameters cannot change in MLflow: a resumed run keeps the values it first logged
        # (what it may change on resume is how long and where it runs: `train.steps`, `ray.*`).
        have = self.client.get_run(self.run_id).data.params
        new = [Param(k, v[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def send(self, points):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for step, values in points for key, value in values.items()]
        for i in range(0, len(metrics), self.BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + self.BATCH])

    def artifacts(self, paths):
        for path in paths:
            self.client.log_artifact(self.run_id, path)

    def notes(self, notes):
        for key, value in notes.items():
            self.client.set_tag(self.run_id, key, value)

    def close(self, status):
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)


class WandbWriter(Writer):
    """One W&B run, resumed by its id (`resume="allow"`); offline runs are written under `folder`
    (`wandb/offline-run-…`), one folder per open of the run, all under the one id."""

    name, package = "wandb", ("wandb", "wandb")

    def __init__(self, project: str, entity: str | None, mode: str, folder: str, run_name: str,
                 group: str | None = None):
        self.project, self.entity, self.mode, self.folder, self.run_name = project, entity, mode, folder, run_name
        self.group, self.run = group, None  # group: the comparison a cell's run belongs to (`parents.py`)

    def open(self, kept):
        import wandb

        os.makedirs(self.folder, exist_ok=True)
        run_id = (kept or {}).get("id") or uuid.uuid4().hex[:12]
        self.run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, dir=self.folder, id=run_id,
                              name=self.run_name, group=self.group, resume="allow", reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                                      disable_git=True, save_code=False))
        # W&B drops a step below the one it is at; online, a resumed run says where that is.
        self.held = max(int((kept or {}).get("sent", 0)), (self.run.starting_step or 1) - 1)
        return {"id": run_id, "mode": self.mode}

    def params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def send(self, points):
        for step, metrics in points:
            self.run.log(metrics, step=step)

    def artifacts(self, paths):
        import shutil

        for path in paths:  # files in the run's own folder are sent with it (a symlink would dangle)
            shutil.copy(path, self.run.dir)

    def notes(self, notes):
        self.run.summary.update(notes)

    def close(self, status):
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)
