"""The Ray runner: the same `train_peer` loop inside Ray Train `TorchTrainer`s (Train V2).

One group (every-step methods): K peers × M data-parallel workers per peer = K·M workers of
one Ray Train run; world rank r belongs to peer r // M as its replica r % M. Ray Train gives
placement (one GPU per peer on a workstation), the process group (gloo on CPU, NCCL on GPU),
checkpoints in `storage_path` and restarts from the newest checkpoint after a failure
(`FailureConfig`) — of the whole group.

Apart (methods that exchange in rounds, `engine/apart.py`): one Ray Train run per peer, each of
its own size (`peers.<k>.workers`), failing, checkpointing and restarting on its own.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import threading

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from codistill.config import ConfigError, ExperimentConfig, load_config, to_dict
from codistill.data import DATASETS, load_data
from codistill.engine.apart import BoardExchange, EvaluationBoard, runs_apart
from codistill.engine.checkpoint import (CHECKPOINT_DIR, META_FILE, checkpoint_folders, checkpoint_name, meta_state,
                                         newest_loadable, past_damaged, peer_file, peer_run_dir, to_bytes)
from codistill.engine.job import make_job, peer_schedules
from codistill.engine.loop import RunContext, train_peer
from codistill.engine.placement import check_apart_placement, check_placement, resources_per_worker
from codistill.engine.registrations import adopt_registrations, user_registrations
from codistill.engine.threads import run_in_threads
from codistill.errors import RunError, first_line
from codistill.exchange.collective import CollectiveExchange
from codistill.exchange.object_store import (GatherCoordinator, ObjectStoreExchange, ObjectStorePeriodicExchange,
                                             PublicationCoordinator)
from codistill.methods import create_method
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
                 num_peers: int, apart: bool = False):
        self.num_peers = num_peers
        self.apart = apart  # this Ray Train run trains this peer alone
        self.storage = storage
        self.peer = peer
        self.leader = leader
        self.progress_mailbox = progress_mailbox
        self.cfg_dict = cfg_dict
        self.node = ray.get_runtime_context().get_node_id()
        self.retrain = (0, 0)  # (up to which step, mark): retrained checkpoints get folders of their own

    def restore(self, peer: int) -> dict | None:
        folders = checkpoint_folders(self.storage, [peer_run_dir(peer) if self.apart else ""])
        if self.apart:
            # A peer apart is its run's only writer, and a folder of it counts once its meta.pt is
            # there and its peer file loads, whether or not Ray took the report in: Ray Train
            # registers a checkpoint when its controller next polls the worker, so a worker killed
            # after uploading step 200 restarts, by Ray's count, from step 100 — and the other
            # peers' rounds it would read again from there may be gone from the board.
            newest = folders[-1][0] if folders else None
        else:
            # One group: Ray's newest committed checkpoint (every peer's file reached it), or the
            # newest before it whose every peer file loads.
            checkpoint = ray.train.get_checkpoint()
            newest = (None if checkpoint is None
                      else int(CHECKPOINT_DIR.fullmatch(os.path.basename(checkpoint.path.rstrip("/"))).group(1)))
        if newest is None:
            if self.leader:  # parts of a training whose checkpoints are gone would be stitched to this one's
                drop_records_after(self.storage, peer, 0)
            return None
        folders = [(step, folder) for step, folder in folders if step <= newest]
        found = newest_loadable(self.storage, folders, [peer] if self.apart else self.num_peers)
        if found is None:
            raise RunError(f"no checkpoint of {self.storage.uri} up to step {newest} loads; see the warnings above")
        step, states = found
        if step < newest:  # the newer checkpoints did not load: their steps are trained again
            self.retrain = (newest, past_damaged(self.storage, folders, step, copy_aside=self.leader))
        if self.leader:
            drop_records_after(self.storage, peer, step)
        return states[0] if self.apart else states[peer]

    def report(self, step: int, metrics: dict, checkpoint: dict | None, records: list[dict]) -> None:
        if checkpoint is None and not records:
            ray.train.report(metrics)
            return
        write_record_part(self.storage, self.peer, records)
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, peer_file(self.peer)), "wb") as f:
                f.write(to_bytes(checkpoint))
            if self.peer == 0 or self.apart:  # the file that completes a checkpoint folder
                with open(os.path.join(folder, META_FILE), "wb") as f:
                    f.write(to_bytes(meta_state(step, self.cfg_dict)))
            # Every worker uploads into the same folder (Ray syncs the name across ranks).
            below, mark = self.retrain
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=checkpoint_name(step, mark if step <= below else 0))

    def progress(self, step: int, metrics: dict) -> None:
        # The pid lets an operator (or the fault tests) find the process that runs peer 0.
        self.progress_mailbox.post.remote(step, {**metrics, "pid": os.getpid()})


def _data_parallel_groups(num_peers: int, replicas: int, peer: int, replica: int):
    """Process groups for K peers × M replicas: this worker's peer (DDP) and its column
    (replica m of every peer: they hold the same slice of the batch, so they exchange).
    Every rank creates every group, in the same order, as torch.distributed requires."""
    peer_groups = [dist.new_group([p * replicas + r for r in range(replicas)]) for p in range(num_peers)]
    columns = [dist.new_group([p * replicas + r for p in range(num_peers)]) for r in range(replicas)]
    return peer_groups[peer], columns[replica]


def ray_train_loop(loop_config: dict) -> None:
    """Runs in every Ray Train worker."""
    # The worker imports codistill afresh: what the user registered (even in a script's
    # __main__) arrives with the run, and the config's `imports` are imported by load_config.
    adopt_registrations(loop_config["registrations"])
    cfg: ExperimentConfig = load_config(loop_config["experiment"])
    context = ray.train.get_context()
    apart = loop_config.get("peer") is not None  # this run trains one peer, of its own size
    if apart:
        peer_index, replica, replicas = loop_config["peer"], context.get_world_rank(), context.get_world_size()
    else:
        replicas = cfg.ray.workers_per_peer
        peer_index, replica = divmod(context.get_world_rank(), replicas)
    device = ray.train.torch.get_device()
    torch.set_num_threads(loop_config["threads_per_worker"])

    data = load_data(cfg.data)
    peer_group, exchange_group, data_parallel = None, None, None
    if replicas > 1:
        if not apart:  # DDP over the peer's workers; its column of replicas exchanges
            peer_group, exchange_group = _data_parallel_groups(cfg.num_peers, replicas, peer_index, replica)
        data_parallel = functools.partial(torch.nn.parallel.DistributedDataParallel, process_group=peer_group,
                                          device_ids=[device.index] if device.type == "cuda" else None)
    if apart:
        exchange = BoardExchange(loop_config["evaluation_board"], peer_index, cfg.num_peers)
    elif cfg.exchange.transport == "collective":
        exchange = CollectiveExchange(peer_index, cfg.num_peers, exchange_group, device)
    else:
        exchange = ObjectStoreExchange(loop_config["gather_coordinators"][replica], peer_index, cfg.num_peers)
    periodic = None
    if loop_config["publication_coordinator"] is not None:
        periodic = ObjectStorePeriodicExchange(loop_config["publication_coordinator"], peer_index, apart=apart)
    job = make_job(cfg, peer_index, data, peer_schedules(cfg, len(data.y_train)), device, exchange, periodic,
                   replica=replica, replicas=replicas, data_parallel=data_parallel)
    storage = RunStorage(cfg.ray.storage_path, cfg.name)
    run = RayRunContext(storage, peer_index, job.is_leader, loop_config["progress_mailbox"], loop_config["experiment"],
                        cfg.num_peers, apart)
    train_peer(job, run, cfg.data.eval_batch_size)


def on_this_node(actor_class):
    """`actor_class` pinned to the node of the calling process (the driver, or a Tune trial).
    The coordinators hold run state the peers need after a restart; on a peer's node they would die
    with it, and the run with them. The driver's death ends the run anyway."""
    here = ray.get_runtime_context().get_node_id()
    return actor_class.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))


def _trainer(cfg: ExperimentConfig, loop_config: dict, num_workers: int, per_worker: dict[str, float], name: str,
             storage_path: str, callbacks=()) -> TorchTrainer:
    """One Ray Train run of `ray_train_loop`: the group's, or one peer's when peers run apart."""
    loop_config = {"experiment": to_dict(cfg), "registrations": user_registrations(),
                   "threads_per_worker": max(1, int(per_worker.get("CPU", 1))), **loop_config}
    return TorchTrainer(
        ray_train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=per_worker.get("GPU", 0) > 0,
                                               resources_per_worker=per_worker,
                                               placement_strategy=cfg.ray.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints or None),
            callbacks=list(callbacks),
        ),
    )


def make_trainer(cfg: ExperimentConfig, storage: RunStorage, progress_mailbox, callbacks=()) -> TorchTrainer:
    replicas = cfg.ray.workers_per_peer
    coordinators = []
    if cfg.exchange.transport == "object_store":
        coordinators = [on_this_node(GatherCoordinator).remote(cfg.num_peers) for _ in range(replicas)]
    publications = None
    if create_method(cfg.method).needs.rounds is not None:
        publications = on_this_node(PublicationCoordinator).remote(cfg.num_peers)
    loop_config = {"publication_coordinator": publications, "gather_coordinators": coordinators,
                   "progress_mailbox": progress_mailbox}
    return _trainer(cfg, loop_config, cfg.num_peers * replicas, resources_per_worker(cfg, ray.cluster_resources()),
                    cfg.name, storage.storage_path, callbacks)


def make_apart_trainers(cfg: ExperimentConfig, storage: RunStorage, progress_mailbox) -> list[TorchTrainer]:
    """One Ray Train run per peer, `<run>/peer<k>`, meeting only through the boards (which live on
    this node and outlive every peer's restarts)."""
    cluster = ray.cluster_resources()
    publications = on_this_node(PublicationCoordinator).remote(cfg.num_peers, apart=True)
    board = on_this_node(EvaluationBoard).remote(cfg.num_peers, storage.uri, DATASETS[cfg.data.name].input_kind == "tokens")
    loop_config = {"publication_coordinator": publications, "evaluation_board": board,
                   "progress_mailbox": progress_mailbox}
    return [_trainer(cfg, {**loop_config, "peer": k}, cfg.workers_of(k), resources_per_worker(cfg, cluster, k),
                     peer_run_dir(k), storage.uri) for k in range(cfg.num_peers)]


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
            # Peers apart fail apart: the others trained on to their end; say which peer stopped.
            raise RunError(f"peer {k}'s Ray Train run failed ({first_line(_own_error(err), 300)}); the other peers "
                           f"trained to the end. Re-run the same command to resume peer {k} from its newest "
                           "checkpoint, or set ray.max_failures to let Ray restart a failed peer") from err
        raise err
    return results


def run_ray(cfg: ExperimentConfig, storage: RunStorage, on_progress=None, callbacks=()):
    """Train all peers of `cfg` on the Ray cluster this process is connected to: one Ray Train
    run for the group, or one per peer when they run apart (`engine/apart.py`). Tune's callbacks
    report one run's results, so a Tune trial keeps one group."""
    # A private local instance (no address given) has the size it was started with.
    fixed_size = cfg.ray.address is None and not os.environ.get("RAY_ADDRESS")
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    apart = runs_apart(cfg)
    sized = [i for i, p in enumerate(cfg.peers) if p.workers or p.resources]
    if callbacks and apart and sized:
        raise ConfigError(f"peers.{sized[0]}.workers", "a Tune trial trains its peers as one group (one Ray Train run "
                          "reports to Tune), so peers cannot have sizes of their own there: use ray.workers_per_peer")
    progress_mailbox = on_this_node(ProgressMailbox).remote()
    if apart and not callbacks:
        check_apart_placement(cfg, ray.cluster_resources(), nodes, fixed_size)
        trainers = make_apart_trainers(cfg, storage, progress_mailbox)
    else:
        check_placement(cfg, resources_per_worker(cfg, ray.cluster_resources()), nodes, fixed_size)
        trainers = [make_trainer(cfg, storage, progress_mailbox, callbacks)]
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
        if on_progress:
            try:
                step, metrics = ray.get(progress_mailbox.get.remote(), timeout=30)
                on_progress(step, metrics)
            except ray.exceptions.RayError as error:  # best-effort: must not hide fit()'s own error
                logger.warning("Final progress not available: %s", error)
        ray.kill(progress_mailbox)
