"""How the Ray runner lays the peers out over Ray Train runs: one object per layout, owning how
its peers are placed and launched, what each worker exchanges through, where a restart resumes
from, and how evaluations reach the group's figures. Nothing outside these classes asks which
layout a run has.

- `OneGroup` (every-step methods, and `ray.layout: one_group`): K peers × M data-parallel workers
  per peer = K·M workers of a single Ray Train run; world rank r belongs to peer r // M as its replica
  r % M. The peers live and die together: one `FailureConfig`, one checkpoint folder per step
  (peer 0 completes it), a restart of the whole group from Ray's newest committed checkpoint.
- `Apart` (methods that exchange in rounds — codistillation — with `ray.layout: auto`): one Ray
  Train run per peer (`<run>/peer<k>`), each of its own size (`peers.<k>.workers`), failing,
  checkpointing and restarting on its own, as Anil et al. (2018) intend: peers that meet only
  every `period` steps need not live and die together. What they share outlives them all and
  lives on the driver's node: the round board (`LastingRoundBoard`, the only state of the
  training they share: an away peer costs each other peer one wait of `wait_timeout_s`, then it
  is left out, recorded as `missing_peers`, until it has a usable round again) and the
  evaluation board (`EvaluationBoard`: peers evaluate alone; once every peer has evaluated a
  step, the board writes the group's figures of that step, which the records fill into the
  peers' test rows).

The layout is chosen from the method's declared traits (`exchanges_in_rounds`), never from its
name; a Tune trial keeps one group (one Ray Train run reports to Tune). A third layout (one
data-parallel model on the same workers) would be a third subclass.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from codistill.config import ConfigError, ExperimentConfig
from codistill.data import DATASETS
from codistill.data.task import Task
from codistill.engine.checkpoint import CHECKPOINT_DIR, peer_run_dir
from codistill.engine.evaluate import GROUP_FIELDS, group_figures
from codistill.engine.placement import check_placement, check_placement_per_peer, resources_per_worker
from codistill.exchange.base import Exchange, Payload, PeriodicExchange
from codistill.exchange.collective import CollectiveExchange
from codistill.exchange.object_store import GatherCoordinator, ObjectStoreExchange
from codistill.exchange.round_board import GroupRoundBoard, LastingRoundBoard, ObjectStorePeriodicExchange
from codistill.records import write_group_row
from codistill.storage import RunStorage


def on_this_node(actor_class):
    """`actor_class` pinned to the node of the calling process (the driver, or a Tune trial).
    The boards hold run state the peers need after a restart; on a peer's node they would die
    with it, and the run with them. The driver's death ends the run anyway."""
    here = ray.get_runtime_context().get_node_id()
    return actor_class.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))


@dataclass
class RunSpec:
    """One Ray Train run the driver starts: what its workers get beside the experiment, its size
    and where Ray Train keeps it."""

    loop_config: dict
    num_workers: int
    per_worker: dict[str, float]
    name: str
    storage_path: str


@dataclass
class WorkerLinks:
    """What one Ray Train worker trains with besides its data: its place among the peers, and
    how it meets them."""

    peer: int
    replica: int
    replicas: int
    exchange: Exchange | None = None
    """Every step's all-gather (and the evaluations'), for peers in one group."""
    board: "BoardPoster | None" = None
    """Where a peer that evaluates alone posts its test logits."""
    periodic: PeriodicExchange | None = None
    data_parallel: Callable | None = field(default=None, repr=False)
    """Wraps the peer's network for DDP over its replicas."""


def _ddp(device: torch.device, process_group=None):
    return functools.partial(torch.nn.parallel.DistributedDataParallel, process_group=process_group,
                             device_ids=[device.index] if device.type == "cuda" else None)


class Layout:
    name: str

    # -- the driver ---------------------------------------------------------------------------
    def check_placement(self, cfg: ExperimentConfig, cluster: dict[str, float], nodes: list[dict[str, float]],
                        fixed_size: bool) -> None:
        raise NotImplementedError

    def runs(self, cfg: ExperimentConfig, storage: RunStorage, shared: dict) -> list[RunSpec]:
        """The Ray Train runs to start; `shared` goes into every worker's loop config."""
        raise NotImplementedError

    # -- a worker -----------------------------------------------------------------------------
    def links(self, cfg: ExperimentConfig, loop_config: dict, device: torch.device) -> WorkerLinks:
        raise NotImplementedError

    def checkpoint_parent(self, peer: int) -> str:
        """The folder (relative to the run) where Ray Train keeps this peer's checkpoints."""
        raise NotImplementedError

    def newest_step(self, folders: list[tuple[int, str]]) -> int | None:
        """The newest checkpoint a restart may resume from, of the complete `folders`."""
        raise NotImplementedError

    def saved_peers(self, peer: int, num_peers: int) -> list[int]:
        """The peers whose files a checkpoint this peer resumes from must hold."""
        raise NotImplementedError

    def completes_checkpoint(self, peer: int) -> bool:
        """Whether this peer writes the file that completes a checkpoint folder (`meta.pt`)."""
        raise NotImplementedError


class OneGroup(Layout):
    name = "one_group"

    def check_placement(self, cfg, cluster, nodes, fixed_size):
        check_placement(cfg, resources_per_worker(cfg, cluster), nodes, fixed_size)

    def runs(self, cfg, storage, shared):
        coordinators = []
        if cfg.exchange.transport == "object_store":
            coordinators = [on_this_node(GatherCoordinator).remote(cfg.num_peers) for _ in range(cfg.ray.workers_per_peer)]
        rounds = on_this_node(GroupRoundBoard).remote(cfg.num_peers) if cfg.method.exchanges_in_rounds else None
        loop_config = {**shared, "round_board": rounds, "gather_coordinators": coordinators}
        return [RunSpec(loop_config, cfg.num_peers * cfg.ray.workers_per_peer,
                        resources_per_worker(cfg, ray.cluster_resources()), cfg.name, storage.storage_path)]

    def links(self, cfg, loop_config, device):
        replicas = cfg.ray.workers_per_peer
        peer, replica = divmod(ray.train.get_context().get_world_rank(), replicas)
        peer_group, exchange_group = _data_parallel_groups(cfg.num_peers, replicas, peer, replica) if replicas > 1 else (None, None)
        if cfg.exchange.transport == "collective":
            exchange = CollectiveExchange(peer, cfg.num_peers, exchange_group, device)
        else:
            exchange = ObjectStoreExchange(loop_config["gather_coordinators"][replica], peer, cfg.num_peers)
        periodic = (ObjectStorePeriodicExchange(loop_config["round_board"], peer)
                    if loop_config["round_board"] is not None else None)
        return WorkerLinks(peer, replica, replicas, exchange=exchange, periodic=periodic,
                           data_parallel=_ddp(device, peer_group) if replicas > 1 else None)

    def checkpoint_parent(self, peer):
        return ""

    def newest_step(self, folders):
        # Ray's newest committed checkpoint (every peer's file reached it); the caller falls back
        # to the newest before it whose every peer file loads.
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        return int(CHECKPOINT_DIR.fullmatch(os.path.basename(checkpoint.path.rstrip("/"))).group(1))

    def saved_peers(self, peer, num_peers):
        return list(range(num_peers))  # every worker asks for every peer's file: all agree on one step

    def completes_checkpoint(self, peer):
        return peer == 0


class Apart(Layout):
    name = "apart"

    def check_placement(self, cfg, cluster, nodes, fixed_size):
        check_placement_per_peer(cfg, cluster, nodes, fixed_size)

    def runs(self, cfg, storage, shared):
        cluster = ray.cluster_resources()
        rounds = on_this_node(LastingRoundBoard).remote(cfg.num_peers)
        board = on_this_node(EvaluationBoard).remote(cfg.num_peers, storage.uri, DATASETS[cfg.data.name].task)
        loop_config = {**shared, "round_board": rounds, "evaluation_board": board}
        return [RunSpec({**loop_config, "peer": k}, cfg.workers_of(k), resources_per_worker(cfg, cluster, k),
                        peer_run_dir(k), storage.uri) for k in range(cfg.num_peers)]

    def links(self, cfg, loop_config, device):
        context = ray.train.get_context()
        peer, replica, replicas = loop_config["peer"], context.get_world_rank(), context.get_world_size()
        return WorkerLinks(peer, replica, replicas,
                           board=BoardPoster(loop_config["evaluation_board"], peer),
                           periodic=ObjectStorePeriodicExchange(loop_config["round_board"], peer, restarts_alone=True),
                           data_parallel=_ddp(device) if replicas > 1 else None)  # DDP over this run's workers

    def checkpoint_parent(self, peer):
        return peer_run_dir(peer)

    def newest_step(self, folders):
        # A peer apart is its run's only writer, and a folder of it counts once its meta.pt is
        # there and its peer file loads, whether or not Ray took the report in: Ray Train
        # registers a checkpoint when its controller next polls the worker, so a worker killed
        # after uploading step 200 restarts, by Ray's count, from step 100 — and the other
        # peers' rounds it would read again from there may be gone from the board.
        return folders[-1][0] if folders else None

    def saved_peers(self, peer, num_peers):
        return [peer]

    def completes_checkpoint(self, peer):
        return True


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (OneGroup(), Apart())}


def layout_of(cfg: ExperimentConfig, tune_trial: bool = False) -> Layout:
    """The layout of `cfg`'s peers on Ray: apart for a method that exchanges in rounds under
    `ray.layout: auto` (`cfg.own_run_per_peer`), one group otherwise and in a Tune trial."""
    if cfg.own_run_per_peer and tune_trial:
        sized = [i for i, p in enumerate(cfg.peers) if p.workers or p.resources]
        if sized:
            raise ConfigError(f"peers.{sized[0]}.workers", "a Tune trial trains its peers as one group (one Ray Train "
                              "run reports to Tune), so peers cannot have sizes of their own there: use "
                              "ray.workers_per_peer")
    return LAYOUTS["apart" if cfg.own_run_per_peer and not tune_trial else "one_group"]


def _data_parallel_groups(num_peers: int, replicas: int, peer: int, replica: int):
    """Process groups for K peers × M replicas: this worker's peer (DDP) and its column
    (replica m of every peer: they hold the same slice of the batch, so they exchange).
    Every rank creates every group, in the same order, as torch.distributed requires."""
    peer_groups = [dist.new_group([p * replicas + r for r in range(replicas)]) for p in range(num_peers)]
    columns = [dist.new_group([p * replicas + r for p in range(num_peers)]) for r in range(replicas)]
    return peer_groups[peer], columns[replica]


@ray.remote(num_cpus=0)
class EvaluationBoard:
    """Every peer's test logits of an evaluation step, until all have posted it; then the group's
    figures of that step go to the run's records and the logits are dropped."""

    def __init__(self, num_peers: int, run_uri: str, task: type[Task]):
        self.num_peers = num_peers
        self.storage = RunStorage.at(run_uri)
        self.task = task  # the data set's kind of task: how the group is scored
        self.pending: dict[int, dict[int, Payload]] = {}

    def post(self, step: int, peer: int, payload: Payload) -> None:
        posted = self.pending.setdefault(step, {})
        posted[peer] = payload
        if len(posted) < self.num_peers:
            return
        del self.pending[step]
        payloads = [posted[k] for k in range(self.num_peers)]
        figures = group_figures(payloads, payloads[0]["labels"], self.task)
        write_group_row(self.storage, {"step": step, **{k: figures[k] for k in GROUP_FIELDS if k in figures}})


class BoardPoster:
    """A peer's handle on the evaluation board (`evaluate.Poster`)."""

    def __init__(self, board: "ray.actor.ActorHandle", peer: int):
        self.board, self.peer = board, peer

    def post(self, step: int, payload: Payload) -> None:
        # Waited for: the figures are written before the peer's checkpoint of this step is.
        ray.get(self.board.post.remote(step, self.peer, {name: t.detach().cpu() for name, t in payload.items()}))
