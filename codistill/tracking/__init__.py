"""A run's records sent to the experiment trackers it names (`tracking:`): TensorBoard, MLflow,
Weights & Biases — one writer per run, started by the driver whatever the layout, in a process of
its own at the lowest CPU priority (`sender.py`; `docs/tracking.md`).

The tracker writer is a reader of the run's own records. Peers hand their records over only
with a checkpoint (`records.py`), so what the records hold is what a resume keeps; the writer
sends what they hold beyond what it has sent, step by step, to every tracker. That makes it one
writer per run by construction — the local runner's peers, one Ray Train group, or peers apart
in a Ray Train run each all write records into the one run folder, and the driver reads them —
and a worker never imports a tracker nor needs a route to its server; a peer that restarts alone
restarts no writer. What it has sent is kept in the run folder (`tracking/state.json`: each
tracker's run id and the last step it was sent), so a re-run of the name continues the same
tracker runs and sends no step twice (a tracker turned on at a resume is sent the run's records
from step 1). The price: a tracker sees a step once its checkpoint is written
(`train.checkpoint_every`), not while it trains.

Names: a peer's training figures `peer{k}/{term}` (`peer0/loss`, `peer0/kl`, `peer0/lr`,
`peer0/step_ms`, `peer0/peak_memory_mb`, …), its test figures `peer{k}/test_{name}`
(`peer0/test_accuracy`, `peer0/test_bits`), the group's `group/{name}` (`group/ensemble_accuracy`,
`group/churn`, `group/member_mean_accuracy`); the resolved config as parameters under the names
`--set` takes (`peers.0.optimizer.lr`)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import tempfile
import threading

import pyarrow.fs as pafs

from codistill.config import ExperimentConfig, ConfigError, to_dict
from codistill.storage import RunStorage
from codistill.tracking.parents import current
from codistill.tracking.sender import STATE_FILE, Sender, is_group_figure, points_of, serve
from codistill.tracking.writers import MlflowWriter, TensorBoardWriter, WandbWriter, Writer

__all__ = ["STATE_FILE", "RunTracker", "Sender", "flat_params", "is_group_figure", "points_of", "writers_of"]
logger = logging.getLogger(__name__)


def flat_params(data, prefix: str = "") -> dict[str, str]:
    """The resolved config as flat parameters, each under the name `--set` takes."""
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in flat_params(value, f"{prefix}{key}.").items()}
    if isinstance(data, list) and data and any(isinstance(v, (dict, list)) for v in data):
        return {k: v for i, value in enumerate(data) for k, v in flat_params(value, f"{prefix}{i}.").items()}
    return {prefix[:-1]: json.dumps(data) if isinstance(data, (list, dict)) else str(data)}


def _local_folder(storage: RunStorage) -> str | None:
    return storage.run_dir if isinstance(storage.fs, pafs.LocalFileSystem) else None


def writers_of(cfg: ExperimentConfig, storage: RunStorage) -> list[Writer]:
    """The writers `cfg.tracking` asks for."""
    tracking, folder, writers = cfg.tracking, _local_folder(storage), []
    parent = current()  # a comparison's cell: its tracker runs are the comparison's children (parents.py)
    if tracking.tensorboard:
        if folder is None:
            raise ConfigError("tracking.tensorboard", f"writes event files into the run folder, which must be on a "
                              f"local or shared disk; {storage.uri} is not: use tracking.mlflow or tracking.wandb")
        under = parent.tensorboard if parent and parent.tensorboard else None
        writers.append(TensorBoardWriter(os.path.join(under, cfg.name) if under else os.path.join(folder, "tensorboard")))
    if tracking.mlflow:
        tags = {"mlflow.parentRunId": parent.mlflow_run_id} if parent and parent.mlflow_run_id else {}
        writers.append(MlflowWriter(tracking.mlflow.tracking_uri, tracking.mlflow.experiment, cfg.name, tags))
    if tracking.wandb:
        where = folder or os.path.join(tempfile.gettempdir(), "codistill-wandb", cfg.name)
        writers.append(WandbWriter(tracking.wandb.project, tracking.wandb.entity, tracking.wandb.mode, where, cfg.name,
                                   group=parent.wandb_group if parent else None))
    return writers


def _processes():
    """Where the sender processes come from: a fork server, a fresh interpreter (spawned, never a
    fork of the process that trains, its threads and torch's pools) that imports the tracking code
    once; each run's sender is forked from it. A spawned sender would import codistill (torch)
    anew for every run: ~2.5 s of CPU each on the 2-core machine, before the run can start."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([Sender.__module__])  # only when the server starts: once a process
    return context


class RunTracker:
    """The run's handle on its tracker writer, which runs in a process of its own (`sender.py`):
    `open`, then `start` and `poke` it as records land, `finish` with the artifacts, or `close`
    with the status a failed run ends in; as a context manager, an exception closes it FAILED
    (KILLED on Ctrl-C). A tracker that goes away while the run trains is warned of, not fatal."""

    def __init__(self):
        self.process = self.conn = None
        self.state: dict = {}  # what the sender holds: each tracker's run id and last step sent
        self.lock = threading.Lock()  # a peer's thread pokes while the driver may finish
        self.lost = False

    @classmethod
    def open(cls, cfg: ExperimentConfig, storage: RunStorage, group_rows: bool = False) -> "RunTracker":
        """The writers of `cfg.tracking` opened in their process (none: no process, nothing sent),
        continuing the tracker runs the run folder names; anything that cannot open is one line,
        raised here, before the run trains. `group_rows`: the group's figures come from the group
        rows (peers apart), which a step waits for before it is sent."""
        tracker, writers = cls(), writers_of(cfg, storage)
        if not writers:
            return tracker
        for writer in writers:
            writer.check()  # a missing package, asked here without importing it
        context = _processes()
        tracker.conn, theirs = context.Pipe()
        sender = Sender(storage, writers, cfg.num_peers, group_rows)
        # The comparison a cell belongs to (`current()`) was asked above: the writers carry it.
        tracker.process = context.Process(target=serve, name="codistill-tracker", daemon=True,
                                          args=(theirs, sender, flat_params(to_dict(cfg)), dict(os.environ), os.getcwd()))
        tracker.process.start()
        theirs.close()  # so that the sender ending shows here as the pipe's end
        reply = tracker._ask(None)
        if reply is None or reply[0] != "opened":
            tracker._end()
            if reply is None:
                raise ConfigError("tracking", f"the tracker writer's process ended as it opened "
                                  f"(exit code {tracker.process.exitcode})")
            raise ConfigError(reply[1], reply[2])
        tracker.state = reply[1]
        return tracker

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, kind, err, trace) -> None:
        if kind is not None:  # finish() closed it otherwise
            self.close("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")

    def _tell(self, *message) -> None:
        if self.conn is None or self.lost:
            return
        try:
            with self.lock:
                self.conn.send(message)
        except OSError:  # the sender died: the run goes on, `codistill track` sends the rest later
            self.lost = True
            logger.warning("tracking: the tracker writer's process ended (exit code %s); the run goes on "
                           "untracked: `codistill track` sends its records once it ends", self.process.exitcode)

    def _ask(self, message) -> tuple | None:
        """`message` sent (None: nothing) and the sender's reply; None when it is gone."""
        if message is not None:
            self._tell(*message)
        try:
            return None if self.lost else self.conn.recv()
        except (EOFError, OSError):
            return None

    def _end(self) -> None:
        self.conn.close()
        self.process.join()
        self.conn = None

    def start(self, every_s: float | None = None) -> "RunTracker":
        """Send when poked (a checkpoint was committed), and every `every_s`."""
        if every_s is not None:
            self._tell("every", every_s)
        return self

    def poke(self, step: int | None = None) -> None:
        self._tell("poke")

    def finish(self, summary: str, notes: dict[str, str] | None = None) -> None:
        """Waits for the sender to send the last records, the run's summary, config.yaml and plot
        as artifacts and `notes` (where `codistill export` writes a language-model peer from) as
        tags, and to mark the tracker runs finished. A tracker that fails now is warned of: the
        training is done and its records kept."""
        if self.conn is None:
            return
        reply = self._ask(("finish", summary, notes))
        self._end()
        if reply is None:
            logger.warning("tracking: the tracker writer's process ended (exit code %s) before the run's end was "
                           "sent: `codistill track` sends it", self.process.exitcode)
            return
        self.state, failed = reply[1], reply[2]
        if failed:
            logger.warning("tracking: could not send the run's end (%s): `codistill track` sends it once the "
                           "tracker answers", failed)

    def close(self, status: str = "FAILED") -> None:
        """End every tracker run (`KILLED`, `FAILED`, `FINISHED`); a re-run of the name reopens them."""
        if self.conn is not None:
            self._ask(("close", status))
            self._end()
