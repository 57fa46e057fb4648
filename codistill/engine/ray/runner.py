"""The Ray runner: the same `train_peer` loop inside Ray Train `TorchTrainer`s (Train V2).

Ray Train gives placement (one GPU per peer on a workstation), the process group (gloo on CPU,
NCCL on GPU), checkpoints in `storage_path` and restarts from the newest checkpoint after a
failure (`FailureConfig`). How the peers are spread over Ray Train runs — one group, or one run
per peer — is the layout's business (`engine/ray/layouts.py`): this module runs whatever it asks for.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from codistill.config import ConfigError, ExperimentConfig, load_config, to_dict
from codistill.data import load_data
from codistill.engine.checkpoint import (META_FILE, checkpoint_folders, checkpoint_name, meta_state, newest_loadable,
                                         past_damaged, to_bytes, write_peer)
from codistill.engine.job import make_job, peer_schedules
from codistill.engine.ray.layouts import LAYOUTS, Layout, RunSpec, layout_of, on_this_node
from codistill.engine.loop import RunContext, train_peer
from codistill.engine.ray.registrations import adopt_registrations, user_registrations
from codistill.engine.threads import run_in_threads
from codistill.errors import RunError, first_line
from codistill.records import drop_records_after, write_record_part
from codistill.storage import RunStorage

logger = logging.getLogger(__name__)
# How often the driver asks peer 0's mailbox for its step: the progress bar trails the real step
# by about this long (measured: docs/faults.md, "The progress bar").
PROGRESS_POLL_S = 0.2


@ray.remote(num_cpus=0)
class ProgressMailbox:
    """Where peer 0 posts its progress for the driver's progress bar (fire-and-forget)."""

    def __init__(self):
        self.latest: tuple[int, dict] = (0, {})

    def post(self, step: int, metrics: dict) -> None:
        if step >= self.latest[0]:
            self.latest = (step, {**self.latest[1], **metrics})

    def get(self) -> tuple[int, dict]:
        return self.latest


class RayRunContext(RunContext):
    def __init__(self, storage: RunStorage, peer: int, leader: bool, progress_mailbox, cfg_dict: dict,
                 num_peers: int, layout: Layout):
        self.num_peers = num_peers
        self.layout = layout
        self.storage = storage
        self.peer = peer
        self.leader = leader
        self.progress_mailbox = progress_mailbox
        self.cfg_dict = cfg_dict
        self.node = ray.get_runtime_context().get_node_id()
        self.retrain = (0, 0)  # (up to which step, mark): retrained checkpoints get folders of their own

    def restore(self, peer: int) -> dict | None:
        folders = checkpoint_folders(self.storage, [self.layout.checkpoint_parent(peer)])
        newest = self.layout.newest_step(folders)
        if newest is None:
            if self.leader:  # parts of a training whose checkpoints are gone would be stitched to this one's
                drop_records_after(self.storage, peer, 0)
            return None
        folders = [(step, folder) for step, folder in folders if step <= newest]
        saved = self.layout.saved_peers(peer, self.num_peers)
        found = newest_loadable(self.storage, folders, saved)
        if found is None:
            raise RunError(f"no checkpoint of {self.storage.uri} up to step {newest} loads; see the warnings above")
        step, states = found
        if step < newest:  # the newer checkpoints did not load: their steps are trained again
            self.retrain = (newest, past_damaged(self.storage, folders, step, copy_aside=self.leader))
        if self.leader:
            drop_records_after(self.storage, peer, step)
        return states[saved.index(peer)]

    def report(self, step: int, metrics: dict, checkpoint: dict | None, records: list[dict]) -> None:
        if checkpoint is None and not records:
            ray.train.report(metrics)
            return
        write_record_part(self.storage, self.peer, records)
        with tempfile.TemporaryDirectory() as folder:
            if checkpoint is not None:  # every replica of a split peer writes its shards; its leader the file
                write_peer(folder, self.peer, checkpoint, self.leader)
            if self.leader and checkpoint is not None and self.layout.completes_checkpoint(self.peer):
                with open(os.path.join(folder, META_FILE), "wb") as f:
                    f.write(to_bytes(meta_state(step, self.cfg_dict)))
            # Every worker uploads into the same folder (Ray syncs the name across ranks).
            below, mark = self.retrain
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=checkpoint_name(step, mark if step <= below else 0))

    def progress(self, step: int, metrics: dict) -> None:
        # The pid lets an operator (or the fault tests) find the process that runs peer 0.
        self.progress_mailbox.post.remote(step, {**metrics, "pid": os.getpid()})


def ray_train_loop(loop_config: dict) -> None:
    """Runs in every Ray Train worker."""
    # The worker imports codistill afresh: what the user registered (even in a script's
    # __main__) arrives with the run, and the config's `imports` are imported by load_config.
    adopt_registrations(loop_config["registrations"])
    cfg: ExperimentConfig = load_config(loop_config["experiment"])
    layout = LAYOUTS[loop_config["layout"]]
    device = ray.train.torch.get_device()
    torch.set_num_threads(loop_config["threads_per_worker"])
    data = load_data(cfg.data)
    links = layout.links(cfg, loop_config, device)
    job = make_job(cfg, links.peer, data, peer_schedules(cfg, len(data.y_train)), device, links.exchange,
                   links.periodic, place=links.place, evaluations=links.evaluations)
    storage = RunStorage(cfg.ray.storage_path, cfg.name)
    run = RayRunContext(storage, links.peer, job.is_leader, loop_config["progress_mailbox"], loop_config["experiment"],
                        cfg.num_peers, layout)
    train_peer(job, run, cfg.data.eval_batch_size)


def _trainer(cfg: ExperimentConfig, spec: RunSpec, callbacks=()) -> TorchTrainer:
    """One Ray Train run of `ray_train_loop`, as the layout asked for it."""
    loop_config = {"experiment": to_dict(cfg), "registrations": user_registrations(),
                   "threads_per_worker": max(1, int(spec.per_worker.get("CPU", 1))), **spec.loop_config}
    return TorchTrainer(
        ray_train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.per_worker.get("GPU", 0) > 0,
                                               resources_per_worker=spec.per_worker,
                                               placement_strategy=cfg.ray.placement_strategy),
        run_config=ray.train.RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints or None),
            callbacks=list(callbacks),
        ),
    )


def make_trainers(cfg: ExperimentConfig, storage: RunStorage, progress_mailbox, callbacks=(),
                  layout: Layout | None = None) -> list[TorchTrainer]:
    """The Ray Train runs of `cfg`'s layout (a Tune trial's `callbacks` keep one group)."""
    layout = layout or layout_of(cfg, tune_trial=bool(callbacks))
    shared = {"layout": layout.name, "progress_mailbox": progress_mailbox}
    return [_trainer(cfg, spec, callbacks) for spec in layout.runs(cfg, storage, shared)]


def _own_error(err: Exception) -> Exception:
    """A worker's own one-line error (the run diverged, a setting that fails in the worker) is
    the answer, not Ray's wrapping of it."""
    if isinstance(err, ray.train.WorkerGroupError):
        for failure in err.worker_failures.values():
            cause = getattr(failure, "cause", None) or failure
            if isinstance(cause, (RunError, ConfigError)):
                return cause
    return err


def fit_all(trainers: list[TorchTrainer]):
    """Run the trainers side by side (each its own Ray Train run) until every one has ended;
    then raise the first failure, if any. A peer whose run fails for good does not stop the others."""
    if len(trainers) == 1:
        return trainers[0].fit()
    results = run_in_threads(lambda k: trainers[k].fit(), len(trainers), name="peer{}-run", daemon=True)
    failures = [(k, r) for k, r in enumerate(results) if isinstance(r, BaseException)]
    if failures:
        k, err = failures[0]
        if isinstance(err, Exception) and not isinstance(_own_error(err), (RunError, ConfigError)):
            # Runs of one peer each fail alone: the others trained on to their end; say which peer stopped.
            raise RunError(f"peer {k}'s Ray Train run failed ({first_line(_own_error(err), 300)}); the other peers "
                           f"trained to the end. Re-run the same command to resume peer {k} from its newest "
                           "checkpoint, or set ray.max_failures to let Ray restart a failed peer") from err
        raise err
    return results


def check_exchange(cfg: ExperimentConfig, object_store: float) -> None:
    """Before anything starts, for language-model peers that exchange soft targets: the note that
    top-k targets are sent unasked (a large vocabulary; the workers' own logs may not reach this
    terminal), or — whole distributions forced — a refusal when the rounds codistillation keeps
    cannot fit the object store: each round holds period × batch × context × vocab fp32 values
    per peer."""
    from codistill.data import DATASETS, load_data
    from codistill.engine.job import exchanged_top_k, top_k_note, vocabulary_decides_top_k

    entry = DATASETS[cfg.data.name]
    classes = entry.num_classes  # known without loading the data: a classifier's
    if cfg.exchange.top_k and classes and exchanged_top_k(cfg, entry.task(classes)) == 0:  # the job's decision
        logger.warning(top_k_note(cfg, classes, 0))
    if not entry.task.size_decides_top_k or not vocabulary_decides_top_k(cfg):
        return  # nothing to say, and no corpus to load on the driver
    task = load_data(cfg.data).task
    vocab, k = task.size, exchanged_top_k(cfg, task)
    if k:
        logger.warning(top_k_note(cfg, vocab, k))
        return
    rounds = cfg.method.needs.rounds
    if rounds is None or rounds.publish != "predictions" or not object_store:
        return
    if (cfg.train.steps // rounds.period + 1) * rounds.period <= rounds.burn_in:
        return  # the run ends inside burn_in: no round is ever sent, none is kept
    per_round = rounds.period * cfg.data.batch_size * cfg.data.context * vocab * 4
    kept = per_round * (rounds.max_staleness + 1) * cfg.num_peers
    if kept > object_store:
        raise ConfigError("exchange.top_k", (
            f"whole next-token distributions of {vocab} tokens are {per_round / 1e9:.2f} GB a round per peer "
            f"({rounds.period} steps × {cfg.data.batch_size} × {cfg.data.context} positions × {vocab} × 4 bytes); "
            f"{rounds.max_staleness + 1} round{'s' * (rounds.max_staleness > 0)} of {cfg.num_peers} peers "
            f"({kept / 1e9:.1f} GB) cannot fit the "
            f"cluster's object store ({object_store / 1e9:.1f} GB). Send top-k targets (exchange.top_k=64) or "
            "lower method.period"))


def run_ray(cfg: ExperimentConfig, storage: RunStorage, on_progress=None, callbacks=()):
    """Train all peers of `cfg` on the Ray cluster this process is connected to, in the Ray Train
    runs of its layout (`engine/ray/layouts.py`). Tune's callbacks report one run's results, so a
    Tune trial keeps one group."""
    # A private local instance (no address given) has the size it was started with.
    fixed_size = cfg.ray.address is None and not os.environ.get("RAY_ADDRESS")
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    layout = layout_of(cfg, tune_trial=bool(callbacks))
    layout.check_placement(cfg, ray.cluster_resources(), nodes, fixed_size)
    check_exchange(cfg, ray.cluster_resources().get("object_store_memory", 0))
    progress_mailbox = on_this_node(ProgressMailbox).remote()
    trainers = make_trainers(cfg, storage, progress_mailbox, callbacks, layout)
    stop = threading.Event()

    def poll_progress() -> None:
        while not stop.wait(PROGRESS_POLL_S):
            try:
                step, metrics = ray.get(progress_mailbox.get.remote(), timeout=5)
            except Exception:  # noqa: BLE001 — progress is best-effort
                continue
            if on_progress and step:
                on_progress(step, metrics)

    poller = threading.Thread(target=poll_progress, daemon=True)
    poller.start()
    try:
        return fit_all(trainers)
    except ray.train.WorkerGroupError as err:
        own = _own_error(err)
        if own is err:
            raise
        raise own from None
    finally:
        stop.set()
        poller.join()
        layout.close(storage)
        if on_progress:
            try:
                step, metrics = ray.get(progress_mailbox.get.remote(), timeout=30)
                on_progress(step, metrics)
            except ray.exceptions.RayError as error:  # best-effort: must not hide fit()'s own error
                logger.warning("Final progress not available: %s", error)
        ray.kill(progress_mailbox)
