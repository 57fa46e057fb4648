"""`train(cfg)`: the front door both the CLI and the Python API use.

Prepares the run folder (resolved config, resume check), runs the chosen backend, then
gathers the records into one Parquet table, draws the accuracy plot and prints the summary."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import pyarrow as pa
import yaml

from codistill.config import ConfigError, ExperimentConfig, dump_config, first_difference, load_yaml, to_dict
from codistill.engine.checkpoint import checkpoint_folders, newest_loadable, peer_file, peer_run_dir
from codistill.lease import RunLease
from codistill.engine.resume import check_ray_resume
from codistill.engine.stages import prepare_stages
from codistill.engine.stale_peers import warn_of_checkpoints_inside_rounds
from codistill.engine.teacher import resolve_teacher
from codistill.errors import first_line
from codistill.records import consolidate_records, final_metrics, plot_accuracy, summary_text, trained_step
from codistill.storage import RunStorage, StorageError, open_run_storage, resolve_storage_path, storage_errors
from codistill.tracking import RunTracker

CONFIG_FILE = "config.yaml"
# What may change when a run is resumed: how long and where it runs and is watched, not what it trains.
RESUMABLE_SECTIONS = ("train", "ray", "exchange", "tracking")
TRACKER_POLL_S = 5.0  # how often the driver looks for records the Ray workers wrote


@dataclass
class RunResult:
    config: ExperimentConfig
    storage: RunStorage
    records: pa.Table
    final: dict
    plot_path: str

    @property
    def summary(self) -> str:
        return summary_text(self.records, [p.model for p in self.config.peers])


def resolve_run(cfg: ExperimentConfig) -> tuple[ExperimentConfig, RunStorage]:
    """The run's storage (its path resolved, and answering) and its teacher (resolved to one
    file that loads and fits): everything checked before anything is written, nothing written."""
    cfg = replace(cfg, ray=replace(cfg.ray, storage_path=resolve_storage_path(cfg.ray.storage_path)))
    storage = open_run_storage(cfg.ray.storage_path, cfg.name)
    return resolve_teacher(cfg, _stored_teacher(cfg, storage)), storage


def _stored_teacher(cfg: ExperimentConfig, storage: RunStorage):
    """The resolved teacher a run that has trained stored with its config, else None."""
    if cfg.teacher is None:
        return None
    from codistill.config import load_config

    try:
        if not checkpoint_folders(storage):
            return None
        return load_config(load_yaml(storage.read_bytes(CONFIG_FILE).decode())).teacher
    except Exception:  # noqa: BLE001 — no stored teacher to keep; store_config names what differs
        return None


def store_config(cfg: ExperimentConfig, storage: RunStorage) -> None:
    """Store the resolved config — or, when the run has trained, check it against the stored one
    first (re-running a name resumes it). A run that stopped before its first checkpoint trained
    nothing that was kept: its stored config is simply replaced, so a failed start never locks
    the name."""
    trained = [step for step, _ in checkpoint_folders(storage)]
    if trained and storage.exists(CONFIG_FILE):
        try:
            stored = load_yaml(storage.read_bytes(CONFIG_FILE).decode())
        except (UnicodeDecodeError, yaml.YAMLError) as err:
            stored = f"{type(err).__name__}: {first_line(err)}"
        if not isinstance(stored, dict):
            raise ConfigError("name", f"run {cfg.name!r} has checkpoints, but its stored config {storage.uri}/"
                              f"{CONFIG_FILE} cannot be read ({str(stored)[:200]}), so a resume cannot be checked "
                              "against it: restore the file, or choose another `name`")
        check_resumable(cfg, stored, trained[-1], storage.uri)
    with storage_errors("ray.storage_path", storage.uri):
        storage.write_bytes(CONFIG_FILE, dump_config(cfg).encode())


def forget_refused_start(storage: RunStorage) -> None:
    """A new run refused before it wrote anything but its config (its data, a model or its storage
    said no): its folder goes, so nothing is left that looks like a run. Called under the run's
    lease, so no other start of the name can have written there. A folder with anything more (a
    checkpoint, a teacher stage) is left as it is: nothing saved is lost."""
    import posixpath

    import pyarrow.fs as pafs

    from codistill.lease import LEASE_FILE

    try:
        found = storage.fs.get_file_info(pafs.FileSelector(storage.run_dir, recursive=True, allow_not_found=True))
        files = {posixpath.relpath(f.path, storage.run_dir) for f in found if f.type == pafs.FileType.File}
        if files <= {CONFIG_FILE, LEASE_FILE}:
            storage.fs.delete_dir(storage.run_dir)
    except Exception:  # noqa: BLE001 — the refusal is the error to report; a config left behind is only litter
        pass


def check_resumable(cfg: ExperimentConfig, stored: dict, trained: int, uri: str) -> None:
    """A run resumes only with what it trained with: the same method, peers, data, seed and
    teacher. `train.steps` may change only where no learning rate depends on it (a constant
    schedule), and never below the steps already trained."""
    current = to_dict(cfg)
    stored = stored_as_of_today(stored)
    changed = first_difference(*({k: v for k, v in d.items() if k not in RESUMABLE_SECTIONS} for d in (current, stored)))
    if changed:
        path, asked, was = changed
        raise ConfigError(path, f"is {asked!r}, the stored config of run {cfg.name!r} in {uri} has {was!r}; a run "
                          f"resumes only with the same {path.split('.')[0]}. Choose another `name` to start a new run.")
    before = stored.get("train", {}).get("steps")
    if before is None or before == cfg.train.steps:
        return
    if cfg.train.steps < trained:
        raise ConfigError("train.steps", f"run {cfg.name!r} has trained {trained} steps already; it cannot end at "
                          f"{cfg.train.steps}. Choose another `name` for a shorter run.")
    scheduled = [i for i, p in enumerate(cfg.peers) if p.optimizer.schedule != "constant"]
    if scheduled:
        raise ConfigError("train.steps", (
            f"is {cfg.train.steps}, run {cfg.name!r} was started with {before}: the "
            f"{cfg.peers[scheduled[0]].optimizer.schedule} learning-rate schedule of peers.{scheduled[0]} is a "
            "function of train.steps, so the rate would jump at the resume step. Resume with "
            f"train.steps={before}, or choose another `name`; only constant schedules can be extended."))


# Settings removed since a run may have been stored, and why dropping them changes nothing the
# run trained: `train.overlap` gave the plain step's gradients (removed as always slower).
REMOVED_SETTINGS = (("train", "overlap"),)


def stored_as_of_today(stored: dict) -> dict:
    """The stored config read by today's schema: a setting added since the run was stored takes
    its default, which is what the run trained with (so a new setting never blocks a resume),
    and a removed setting that did not change the training is dropped."""
    from codistill.config import load_config

    stored = {k: dict(v) if isinstance(v, dict) else v for k, v in stored.items()}
    for section, key in REMOVED_SETTINGS:
        if isinstance(stored.get(section), dict):
            stored[section].pop(key, None)
    try:
        return to_dict(load_config(stored))
    except Exception:  # noqa: BLE001 — compared as stored; the comparison names what differs
        return stored


def train(cfg: ExperimentConfig, backend: str = "local", on_progress: Callable[[int, dict], None] | None = None,
          callbacks=(), data=None) -> RunResult:
    """Train the peers of `cfg` on the `local` or the `ray` backend. `data`: your own data
    instead of `cfg.data.name` — an ArrayDataset, or (train, test), each (x, y) tensors or a
    map-style Dataset, or a Hugging Face `datasets.Dataset` of documents (see `codistill.data.given`)."""
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    if data is not None:
        from codistill.data.given import register_given

        cfg = replace(cfg, data=replace(cfg.data, name=register_given(data, cfg.data)))  # validated against the peers
    if backend == "ray":
        from codistill.engine.ray.placement import check_shared_storage

        from codistill.engine.ray.connect import connect_ray

        connect_ray(cfg.ray.address)
        # Before anything is written: a run the cluster cannot store must not start.
        check_shared_storage(resolve_storage_path(cfg.ray.storage_path))
    return train_connected(cfg, backend, on_progress, callbacks)


def train_connected(cfg: ExperimentConfig, backend: str, on_progress: Callable[[int, dict], None] | None = None,
                    callbacks=()) -> RunResult:
    """`train` once Ray is connected and its storage checked (a Tune trial: run_sweep did both).
    The run's lease is held from before its first write to after its last."""
    cfg, storage = resolve_run(cfg)  # a teacher or storage that does not work stops here, before the lease
    new = not storage.exists(".")
    # Storage that cannot be written (a file where the folder should be, no permission, a full
    # disk) fails here as a config error: nothing has run yet.
    with storage_errors("ray.storage_path", storage.uri):
        lease = RunLease(storage).acquire()
    try:
        with storage_errors("ray.storage_path", storage.uri):
            store_config(cfg, storage)
        prepare_stages(cfg, storage)  # what a method trains on the teacher first: once, here, before any peer
        warn_of_checkpoints_inside_rounds(cfg)
        # The run's one tracker writer, here on the driver whatever the layout (codistill/tracking/).
        with RunTracker.open(cfg, storage, group_rows=backend == "ray" and cfg.layout == "apart" and not callbacks) as tracker:
            if backend == "local":
                from codistill.engine.local import run_local

                run_local(cfg, storage, on_progress, on_checkpoint=tracker.start().poke)
            else:
                check_ray_resume(storage, cfg.num_peers)  # records that cannot be gathered: refused before training
                from codistill.engine.ray.runner import run_ray

                tracker.start(every_s=TRACKER_POLL_S)  # the workers write the records: read them as they land
                run_ray(cfg, storage, on_progress, callbacks)
            result = finish_run(cfg, storage)
            tracker.finish(result.summary, export_notes(cfg, storage))
        return result
    except ConfigError:  # refused (its data, a model): a new run that wrote only its config leaves no folder
        if new:
            forget_refused_start(storage)
        raise
    except StorageError as err:
        raise StorageError(f"{err}; {saved_up_to(storage, cfg.num_peers)}: re-run the same command to resume once "
                           "the storage can be written") from None
    finally:
        lease.release()


def saved_up_to(storage: RunStorage, num_peers: int) -> str:
    """Where a stopped run stands: the step a re-run resumes from (a damaged newer checkpoint is
    not "saved") — each peer's, when the peers ran apart."""
    try:
        folders = checkpoint_folders(storage)
        own_runs = [f"{peer_run_dir(k)}/" for k in range(num_peers)]
        if any(folder.startswith(tuple(own_runs)) for _, folder in folders):
            steps = [newest_loadable(storage, [(s, f) for s, f in folders if f.startswith(own_runs[k])], [k])
                     for k in range(num_peers)]
            return "the peers are saved up to steps " + ", ".join(
                f"{found[0] if found else 0} (peer {k})" for k, found in enumerate(steps))
        found = newest_loadable(storage, folders, num_peers)
    except Exception:  # noqa: BLE001 — the message must come out whatever the storage says
        found = None
    return (f"the run is saved up to step {found[0]} (its newest checkpoint)" if found
            else "no checkpoint that loads was written yet")


def unfinished_line(storage: RunStorage, table: pa.Table, train, num_peers: int) -> str | None:
    """The line that says a run has not finished — running or stopped, the step its records reach
    of the steps it is configured for (`train`: its stored config's section), its newest
    checkpoint — or None: it has."""
    steps, reached = train.get("steps") if isinstance(train, dict) else None, trained_step(table)
    if not isinstance(steps, int) or reached >= steps:
        return None
    holder = RunLease(storage).live_holder()
    how = f"running: host {holder.get('host')}, pid {holder.get('pid')}" if holder else "stopped"
    return (f"not finished ({how}): its records reach step {reached} of {steps} (train.steps); "
            f"{saved_up_to(storage, num_peers)}" + ("" if holder else "; re-run its train command to resume"))


def export_notes(cfg: ExperimentConfig, storage: RunStorage) -> dict[str, str]:
    """For each peer whose model exports (`hf_causal_lm`), what `codistill export` would write it
    from — the peer's newest checkpoint file, at which step — and the command that writes it:
    sent to the trackers at the end (MLflow tags, TensorBoard text, W&B summary). The newest
    complete checkpoint, not loaded here (export skips one that does not load)."""
    from codistill.models import MODELS

    notes, folders = {}, None
    for k, peer in enumerate(cfg.peers):
        if peer.model not in MODELS or MODELS[peer.model].export is None:
            continue
        folders = checkpoint_folders(storage) if folders is None else folders
        found = [(step, folder) for step, folder in folders if storage.exists(f"{folder}/{peer_file(k)}")]
        if found:
            step, folder = found[-1]
            notes[f"codistill.export.peer{k}"] = storage.uri.rstrip("/") + f"/{folder}/{peer_file(k)}"
            notes[f"codistill.export.peer{k}.step"] = str(step)
            notes[f"codistill.export.peer{k}.command"] = f"codistill export {storage.uri} --peer {k} --to DIR"
    return notes


def finish_run(cfg: ExperimentConfig, storage: RunStorage) -> RunResult:
    records = consolidate_records(storage)
    plot = plot_accuracy(records, storage)
    return RunResult(cfg, storage, records, final_metrics(records), plot)
