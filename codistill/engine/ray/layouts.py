"""How the Ray runner lays the peers out over Ray Train runs: one object per layout, owning how
its peers are placed and launched, what each worker exchanges through, where a restart resumes
from, and how evaluations reach the group's figures. What differs reaches the loop as objects a
worker's `links` hands over — its place in the mesh (`engine/mesh.py`), an evaluation sink
(`evaluate.Gathered` or `evaluate.Posted`) and a round handle that knows what it keeps for a
restart — so the loop, the signal sources and the transports never ask which layout they are in;
the config only resolves `ray.layout` to a layout's name (`ExperimentConfig.layout`).

- `OneGroup` (every-step methods, and `ray.layout: one_group`): K peers × M data-parallel workers
  per peer = K·M workers of a single Ray Train run, one `PeerMesh(K, M)`. The peers live and
  die together: one `FailureConfig`, one checkpoint folder per step (peer 0 completes it), the
  group's round board and the all-gather of evaluations, a restart of the whole group from
  Ray's newest committed checkpoint.
- `Apart` (methods that exchange in rounds — codistillation — with `ray.layout: auto`): one Ray
  Train run per peer (`<run>/peer<k>`, a `PeerMesh(1, workers)` each), each of its own size
  (`peers.<k>.workers`), failing, checkpointing and restarting on its own, as Anil et al.
  (2018) intend: peers that meet only every `period` steps need not live and die together.
  What they share outlives them all and lives on the driver's node: the round board
  (`LastingRoundBoard`, the only state of the training they share: an away peer costs each
  other peer one wait of `wait_timeout_s`, then it is left out, recorded as `missing_peers`,
  until it has a usable round again; it holds at most `exchange.round_board_mb` of rounds, the
  rest being snapshots on the run's storage, `rounds/`, deleted at the run's end) and the evaluation board (`engine/ray/evaluation_board.py`:
  peers evaluate alone; once every peer has evaluated a step, the board writes the group's
  figures of that step, which the records fill into the peers' test rows).

The layout is chosen from the method's declared traits (`exchanges_in_rounds`), never from its
name; a Tune trial keeps one group (one Ray Train run reports to Tune). The data-parallel
baseline is no layout of its own: it is one peer on the K·M workers (`config.data_parallel`), a
one-group run of one peer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
import ray.train
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from codistill.config import ConfigError, ExperimentConfig
from codistill.data import DATASETS
from codistill.engine.checkpoint import CHECKPOINT_DIR, peer_run_dir
from codistill.engine.evaluate import EvaluationSink, Posted
from codistill.engine.ray.evaluation_board import BoardPoster, EvaluationBoard
from codistill.engine.mesh import MeshPlace, PeerMesh
from codistill.engine.ray.placement import check_placement, check_placement_per_peer, resources_per_worker
from codistill.exchange.base import Exchange, PeriodicExchange
from codistill.exchange.collective import CollectiveExchange
from codistill.exchange.object_store import GatherCoordinator, ObjectStoreExchange
from codistill.exchange.round_board import (GroupRoundBoard, LastingRoundBoard, LastingRoundHandle,
                                            ObjectStorePeriodicExchange)
from codistill.exchange.snapshots import ROUNDS_DIR
from codistill.storage import RunStorage, StorageError

logger = logging.getLogger(__name__)


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
    """What one Ray Train worker trains with besides its data: its peer, its place in the mesh,
    and how it meets the other peers."""

    peer: int
    place: MeshPlace
    exchange: Exchange | None = None
    """Every step's all-gather (and the evaluations'), for peers in one group."""
    evaluations: EvaluationSink | None = None
    """Where the worker's evaluations go (None: the all-gather through `exchange`)."""
    periodic: PeriodicExchange | None = None


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

    def close(self, storage: RunStorage) -> None:
        """After every Ray Train run ended (or failed): what the layout leaves in the run's folder."""


class OneGroup(Layout):
    name = "one_group"

    def check_placement(self, cfg, cluster, nodes, fixed_size):
        check_placement(cfg, resources_per_worker(cfg, cluster), nodes, fixed_size)

    def runs(self, cfg, storage, shared):
        coordinators = []
        if cfg.exchange.transport == "object_store":
            coordinators = [on_this_node(GatherCoordinator).remote(cfg.num_peers) for _ in range(cfg.ray.workers_per_peer)]
        rounds = (on_this_node(GroupRoundBoard).remote(cfg.num_peers, workers_per_peer=cfg.ray.workers_per_peer)
                  if cfg.method.exchanges_in_rounds else None)
        loop_config = {**shared, "round_board": rounds, "gather_coordinators": coordinators}
        return [RunSpec(loop_config, cfg.num_peers * cfg.ray.workers_per_peer,
                        resources_per_worker(cfg, ray.cluster_resources()), cfg.name, storage.storage_path)]

    def links(self, cfg, loop_config, device):
        place = PeerMesh(cfg.num_peers, cfg.ray.workers_per_peer).build(device)
        peer = place.peer
        if cfg.exchange.transport == "collective":
            exchange = CollectiveExchange(peer, cfg.num_peers, place.peer_group, device)
        else:
            exchange = ObjectStoreExchange(loop_config["gather_coordinators"][place.replica], peer, cfg.num_peers)
        periodic = (ObjectStorePeriodicExchange(loop_config["round_board"], peer, place.replica)
                    if loop_config["round_board"] is not None else None)
        return WorkerLinks(peer, place, exchange=exchange, periodic=periodic)

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
        rounds = on_this_node(LastingRoundBoard).remote(cfg.num_peers, board_bytes(cfg))
        board = on_this_node(EvaluationBoard).remote(cfg.num_peers, storage.uri, DATASETS[cfg.data.name].task)
        loop_config = {**shared, "round_board": rounds, "evaluation_board": board}
        return [RunSpec({**loop_config, "peer": k}, cfg.workers_of(k), resources_per_worker(cfg, cluster, k),
                        peer_run_dir(k), storage.uri) for k in range(cfg.num_peers)]

    def links(self, cfg, loop_config, device):
        peer = loop_config["peer"]
        place = PeerMesh(1, cfg.workers_of(peer)).build(device)  # this peer's run is a mesh of one peer
        periodic = LastingRoundHandle(loop_config["round_board"], peer, cfg.num_peers,
                                      RunStorage(cfg.ray.storage_path, cfg.name), board_bytes(cfg))
        return WorkerLinks(peer, place, evaluations=Posted(BoardPoster(loop_config["evaluation_board"], peer)),
                           periodic=periodic)

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

    def close(self, storage):
        # The rounds the board still referenced: a new run (a re-run resumes) starts a new board.
        try:
            storage.delete(ROUNDS_DIR)
        except StorageError as err:  # never hide how the runs ended
            logger.warning("the run's round snapshots stay in %s/%s: %s", storage.uri, ROUNDS_DIR, err.cause)


def board_bytes(cfg: ExperimentConfig) -> int:
    return int(cfg.exchange.round_board_mb * 2**20)


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (OneGroup(), Apart())}


def layout_of(cfg: ExperimentConfig, tune_trial: bool = False) -> Layout:
    """The layout of `cfg`'s peers on Ray: apart for a method that exchanges in rounds under
    `ray.layout: auto` (`cfg.layout`), one group otherwise and in a Tune trial."""
    if cfg.layout == "apart" and tune_trial:
        sized = [i for i, p in enumerate(cfg.peers) if p.workers or p.resources]
        if sized:
            raise ConfigError(f"peers.{sized[0]}.workers", "a Tune trial trains its peers as one group (one Ray Train "
                              "run reports to Tune), so peers cannot have sizes of their own there: use "
                              "ray.workers_per_peer")
    return LAYOUTS["one_group" if tune_trial else cfg.layout]
