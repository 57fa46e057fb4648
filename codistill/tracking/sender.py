"""What the run's tracker writer does, and the process it does it in (`RunTracker` in `__init__.py`
is the run's handle on it).

`Sender` reads the run's records and sends every step they hold beyond what each tracker holds
(`sync`), then the run's end (`finish`); `codistill track` uses it as it is, in its own process,
since nothing trains there. A training run's `Sender` lives in a process of its own (`serve`), at
the lowest CPU priority (nice 19, and Linux's idle class while the run trains): on a machine
whose cores the peers fill, the writer (and what it starts, W&B's `wandb-core`) takes only the
CPU they leave, and never the GIL of the peers' threads — a thread of the driver cost 5 ms steps
1.7× (docs/benchmarks.md). Training waits for no tracker."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import tempfile

import pyarrow.parquet as pq

from codistill.errors import ConfigError, first_line
from codistill.records import GROUP_DIR, read_part, record_parts
from codistill.storage import RunStorage
from codistill.tracking.writers import Writer

STATE_FILE = "tracking/state.json"
# Columns that say which row it is, not what was measured.
IDENTITY = {"step", "peer", "split", "node", "time", "workers", "metric"}
logger = logging.getLogger("codistill.tracking")


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


class Sender:
    """The writers of one run: `open`, `sync` as records land, `finish` with the artifacts, or
    `close` with the status a failed run ends in."""

    def __init__(self, storage: RunStorage, writers: list[Writer], num_peers: int, group_rows: bool = False):
        self.storage, self.writers, self.num_peers, self.group_rows = storage, writers, num_peers, group_rows
        self.state: dict = {}

    def open(self, params: dict[str, str]) -> "Sender":
        """Every writer opened, continuing the tracker runs the run folder names, and sent `params`
        (the resolved config, flat); anything that fails is one line (ConfigError)."""
        if not self.writers:
            return self
        self.state = json.loads(self.storage.read_bytes(STATE_FILE)) if self.storage.exists(STATE_FILE) else {}
        for writer in self.writers:
            writer.check()
        for writer in self.writers:
            try:
                self.state[writer.name] = {**writer.open(self.state.get(writer.name)), "sent": writer.held}
                writer.params(params)
            except ConfigError:
                self.close("FAILED")
                raise
            except Exception as err:  # noqa: BLE001 — a server that does not answer, a refused login: one line
                self.close("FAILED")
                raise ConfigError(f"tracking.{writer.name}", f"cannot open the {writer.name} run: "
                                  f"{type(err).__name__}: {first_line(err)}") from None
        self._save()
        return self

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

    def finish(self, summary: str, notes: dict[str, str] | None = None) -> None:
        """The last records, the run's summary, config.yaml and plot as artifacts, `notes` (where
        `codistill export` writes a language-model peer from) as tags; the tracker runs marked finished."""
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
        for writer in self.writers:
            try:
                writer.close(status)
            except Exception as err:  # noqa: BLE001 — the run's own outcome is what to report
                logger.warning("tracking: could not close the %s run: %s", writer.name, first_line(err))
        self.writers = []


def _try_sync(sender: Sender, warned: set[str]) -> None:
    try:
        sender.sync()
    except Exception as err:  # noqa: BLE001 — a tracker that is away must not stop the training
        message = f"{type(err).__name__}: {first_line(err)}"
        if message not in warned:  # what was not sent is sent at the next try
            warned.add(message)
            logger.warning("tracking: could not send the newest records (%s); trying again later", message)


def _die_with_the_run() -> None:
    """Killed as the run's process is (SIGKILL: nothing closed, as a writer thread was): Linux's
    parent-death signal, sent when the fork server, our parent, exits — it does as soon as the run's
    process is gone. A writer that outlived a killed run would race the resumed run's writer, and
    send the steps it was sending a second time."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _scheduling(idle: bool) -> None:
    """Every thread of this process (the trackers' own, started as they opened, too) in Linux's
    idle class, or back in the normal one at nice 19 (allowed without privileges: the nice value
    stays where it is)."""
    if not hasattr(os, "SCHED_IDLE"):
        return
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(task), policy, os.sched_param(0))
        except OSError:  # a thread that ended meanwhile, or a system that refuses: the default stays
            pass


def serve(conn, sender: Sender, params: dict[str, str], env: dict[str, str], cwd: str) -> None:
    """The sender process: open, then send when poked ("poke"), every `every_s` once told
    ("every"), and at the end ("finish", "close"); replies to the run over `conn`."""
    # First, so every thread and process it starts (W&B's wandb-core) inherits it: the writer
    # takes only CPU the run does not want. Nice 19 alone still cost 5 ms steps ~1.3× in a short
    # try here, likely a peer thread that wakes (its turn at the GIL, the exchange's barrier)
    # waiting out the writer's slice on its core: Linux's idle class is preempted at once. That
    # class only while the run trains: opening in it, a machine busy with anything else (another
    # run) starved the open the run waits for — nice 19 still gets a share.
    os.nice(19)
    # Ctrl-C reaches the whole process group: the run decides, and tells this process KILLED.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_the_run()
    os.environ.clear()  # the run's, now (the fork server holds the environment it started with)
    os.environ.update(env)
    os.chdir(cwd)
    try:
        sender.open(params)
    except ConfigError as err:
        conn.send(("refused", err.path, err.message))
        return
    _scheduling(idle=True)  # the run trains now
    conn.send(("opened", sender.state))
    every_s, warned = None, set()
    while True:
        try:
            if not conn.poll(every_s):
                _try_sync(sender, warned)
                continue
            kind, *args = conn.recv()
            while kind == "poke" and conn.poll(0):  # pokes that piled up are one send
                kind, *args = conn.recv()
        except (EOFError, OSError):  # the run's process is gone (SIGKILL): so is its writer, as before
            os._exit(1)
        if kind == "every":
            every_s = args[0]
        elif kind == "poke":
            _try_sync(sender, warned)
        elif kind == "finish":
            _scheduling(idle=False)  # the run waits for its end: a share of a busy machine, not none
            try:
                sender.finish(*args)
                failed = None
            except Exception as err:  # noqa: BLE001 — the training is done and its records kept
                sender.close("FAILED")
                failed = f"{type(err).__name__}: {first_line(err)}"
            conn.send(("finished", sender.state, failed))
            return
        elif kind == "close":
            _scheduling(idle=False)
            sender.close(args[0])
            conn.send(("closed",))
            return
