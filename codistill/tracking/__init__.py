"""A run's records sent to the experiment trackers it names (`tracking:`): TensorBoard, MLflow,
Weights & Biases — one writer per run, on the driver, whatever the layout (`docs/tracking.md`).

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

import io
import json
import logging
import os
import tempfile
import threading

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from codistill.config import ExperimentConfig, ConfigError, to_dict
from codistill.errors import first_line
from codistill.records import GROUP_DIR, read_part, record_parts
from codistill.storage import RunStorage
from codistill.tracking.parents import current
from codistill.tracking.writers import MlflowWriter, TensorBoardWriter, WandbWriter, Writer

STATE_FILE = "tracking/state.json"
# Columns that say which row it is, not what was measured.
IDENTITY = {"step", "peer", "split", "node", "time", "workers", "metric"}
logger = logging.getLogger(__name__)


def is_group_figure(column: str) -> bool:
    """The group's figures (the same in every peer's test row): the ensemble's, churn, the members'."""
    return column == "churn" or column.startswith(("ensemble_", "member_"))


def points_of(rows: list[dict]) -> list[tuple[int, dict[str, float]]]:
    """Record rows → (step, {name: value}) in step order, under the names the trackers show."""
    points: dict[int, dict[str, float]] = {}
    for row in rows:
        values = points.setdefault(row["step"], {})
        for column, value in row.items():
            if column in IDENTITY or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if row["split"] == "train":
                values[f"peer{row['peer']}/{column}"] = float(value)
            elif is_group_figure(column):
                values[f"group/{column}"] = float(value)
            else:
                values[f"peer{row['peer']}/{row['split']}_{column}"] = float(value)
    return sorted(points.items())


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


class RunTracker:
    """The run's one tracker writer: `open`, then `sync` (or `poke` its sender thread) as records
    land, `finish` with the artifacts, or `close` with the status a failed run ends in."""

    def __init__(self, storage: RunStorage, writers: list[Writer], num_peers: int, group_rows: bool = False):
        self.storage, self.writers, self.num_peers, self.group_rows = storage, writers, num_peers, group_rows
        self.state: dict = {}
        self.lock = threading.Lock()
        self.wake, self.stop = threading.Event(), threading.Event()
        self.thread: threading.Thread | None = None
        self.warned: set[str] = set()

    @classmethod
    def open(cls, cfg: ExperimentConfig, storage: RunStorage, group_rows: bool = False) -> "RunTracker":
        """The writers of `cfg.tracking` opened (none: a tracker that sends nothing), continuing the
        tracker runs the run folder names. `group_rows`: the group's figures come from the group
        rows (peers apart), which a step waits for before it is sent."""
        tracker = cls(storage, writers_of(cfg, storage), cfg.num_peers, group_rows)
        if tracker.writers:
            tracker.state = json.loads(storage.read_bytes(STATE_FILE)) if storage.exists(STATE_FILE) else {}
            params = flat_params(to_dict(cfg))
            for writer in tracker.writers:
                writer.check()
            for writer in tracker.writers:
                try:
                    tracker.state[writer.name] = {**writer.open(tracker.state.get(writer.name)), "sent": writer.held}
                    writer.params(params)
                except ConfigError:
                    tracker.close("FAILED")
                    raise
                except Exception as err:  # noqa: BLE001 — a server that does not answer, a refused login: one line
                    tracker.close("FAILED")
                    raise ConfigError(f"tracking.{writer.name}", f"cannot open the {writer.name} run: "
                                      f"{type(err).__name__}: {first_line(err)}") from None
            tracker._save()
        return tracker

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, kind, err, trace) -> None:
        if kind is not None:  # finish() closed it otherwise
            self.close("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")

    def _save(self) -> None:
        self.storage.write_bytes(STATE_FILE, json.dumps(self.state, indent=1).encode())

    def _rows_after(self, after: int, final: bool) -> tuple[list[dict], int]:
        """Every peer's rows of the steps after `after`, and the step up to which they can be sent:
        the last one every peer's records reach (and whose group rows are in, for peers apart);
        `final`: whatever there is."""
        rows, reached = [], []
        for peer in range(self.num_peers):
            folder = f"records/peer{peer}"
            parts = record_parts(self.storage, folder)
            reached.append(parts[-1][1] if parts else 0)
            for _, last, name in parts:
                if last > after:
                    rows.extend(r for r in read_part(self.storage, folder, name).to_pylist() if r["step"] > after)
        upto = max(reached) if final else min(reached)
        if self.group_rows:
            group = {}
            for name in self.storage.list(f"records/{GROUP_DIR}"):  # {step:08d}.parquet, one row each
                if name.endswith(".parquet") and name[:-len(".parquet")].isdigit() and int(name[:8]) > after:
                    table = pq.read_table(io.BytesIO(self.storage.read_bytes(f"records/{GROUP_DIR}/{name}")))
                    group.update({row["step"]: row for row in table.to_pylist()})
            # The board writes a step's group row once the last peer has posted that evaluation, just
            # before that peer's checkpoint: the newest evaluation waits for it. An older one without
            # it never gets one (a peer that restarted evaluated it on another board) and goes without.
            newest = max((r["step"] for r in rows if r["split"] == "test" and r["step"] <= upto), default=None)
            for row in rows:
                if row["split"] == "test" and row["step"] <= upto:
                    if row["step"] in group:
                        row.update({k: v for k, v in group[row["step"]].items() if k != "step"})
                    elif row["step"] == newest and not final:
                        upto = row["step"] - 1  # its ensemble and churn are not written yet
        return [r for r in rows if r["step"] <= upto], upto

    def sync(self, final: bool = False) -> None:
        """Send every step the records hold beyond what each tracker holds."""
        if not self.writers:
            return
        with self.lock:
            after = min(self.state[w.name]["sent"] for w in self.writers)
            rows, upto = self._rows_after(after, final)
            if upto <= after:
                return
            points = points_of(rows)
            for writer in self.writers:
                held = self.state[writer.name]["sent"]  # a tracker may hold more than the others (or the records)
                writer.send([(step, values) for step, values in points if step > held])
                self.state[writer.name]["sent"] = max(held, upto)
            self._save()

    # -- the sender thread: training never waits for a tracker ---------------------------------
    def start(self, every_s: float | None = None) -> "RunTracker":
        """Send in a thread of its own: when poked (a checkpoint was committed), and every `every_s`."""
        if self.writers:
            self.thread = threading.Thread(target=self._send_loop, args=(every_s,), name="tracker", daemon=True)
            self.thread.start()
        return self

    def poke(self, step: int | None = None) -> None:
        self.wake.set()

    def _send_loop(self, every_s: float | None) -> None:
        while not self.stop.is_set():
            self.wake.wait(every_s)
            self.wake.clear()
            if self.stop.is_set():
                return
            try:
                self.sync()
            except Exception as err:  # noqa: BLE001 — a tracker that is away must not stop the training
                message = f"{type(err).__name__}: {first_line(err)}"
                if message not in self.warned:  # what was not sent is sent at the next try
                    self.warned.add(message)
                    logger.warning("tracking: could not send the newest records (%s); trying again later", message)

    def _stop_thread(self) -> None:
        self.stop.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join()

    def finish(self, summary: str, notes: dict[str, str] | None = None) -> None:
        """The last records, the run's summary, config.yaml and plot as artifacts, `notes` (where
        `codistill export` writes a language-model peer from) as tags; the tracker runs marked finished."""
        self._stop_thread()
        if not self.writers:
            return
        self.sync(final=True)
        if notes:
            for writer in self.writers:
                writer.notes(notes)
        with tempfile.TemporaryDirectory() as folder:
            paths = []
            for name in ("config.yaml", "accuracy.png"):
                if self.storage.exists(name):
                    paths.append(os.path.join(folder, name))
                    with open(paths[-1], "wb") as f:
                        f.write(self.storage.read_bytes(name))
            paths.append(os.path.join(folder, "summary.txt"))
            with open(paths[-1], "w") as f:
                f.write(summary + "\n")
            for writer in self.writers:
                writer.artifacts(paths)
        self.close("FINISHED")

    def close(self, status: str = "FAILED") -> None:
        """End every tracker run (`KILLED`, `FAILED`, `FINISHED`); a re-run of the name reopens them."""
        self._stop_thread()
        for writer in self.writers:
            try:
                writer.close(status)
            except Exception as err:  # noqa: BLE001 — the run's own outcome is what to report
                logger.warning("tracking: could not close the %s run: %s", writer.name, first_line(err))
        self.writers = []
