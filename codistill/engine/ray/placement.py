"""Where a run's workers go, checked before any starts: what each reserves, whether they fit
the cluster (all at once for one group, one run at a time for peers apart), and that every node
sees the run's storage."""

from __future__ import annotations

import logging
import os
import uuid

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from codistill.config import ConfigError, ExperimentConfig
from codistill.storage import RunStorage

logger = logging.getLogger(__name__)


def resources_per_worker(cfg: ExperimentConfig, cluster: dict[str, float], peer: int | None = None) -> dict[str, float]:
    """What each Ray Train worker reserves (of peer `peer`, when peers run apart), given the
    cluster's total resources.

    Configured resources (`peers.<k>.resources`, else `ray.resources_per_peer`) are split evenly
    over the peer's workers. Unset: one GPU per worker when the cluster has a GPU for every worker
    (a workstation with G GPUs and K ≤ G peers gets one peer per GPU), one CPU per worker when it
    has no GPU at all, and an error when it has some GPUs but too few, rather than silently
    training on CPUs."""
    replicas = cfg.ray.workers_per_peer if peer is None else cfg.workers_of(peer)
    configured = cfg.ray.resources_per_peer if peer is None else (cfg.peers[peer].resources or cfg.ray.resources_per_peer)
    if configured is not None:
        return {name: amount / replicas for name, amount in configured.items()}
    workers = sum(cfg.workers_of(k) for k in range(cfg.num_peers)) if peer is not None else cfg.num_peers * replicas
    gpus = cluster.get("GPU", 0)
    if gpus >= workers:
        return {"CPU": 1.0, "GPU": 1.0}
    if gpus > 0:
        raise ConfigError("ray.resources_per_peer", (
            f"is not set and the cluster has {gpus:g} GPUs for {cfg.num_peers} peers with {workers} worker(s) in "
            f"all; one GPU per worker needs {workers}. Set it: {{CPU: 1}} trains on CPUs; "
            "{GPU: 0.5} puts two peers on a GPU (with exchange.transport: object_store, since NCCL "
            "cannot run two ranks on one GPU); or use fewer peers."))
    return {"CPU": 1.0}


def _path_exists(path: str) -> bool:
    return os.path.exists(path)


def check_shared_storage(storage_path: str) -> None:
    """Refuse a local storage path that some node of the cluster cannot see.

    Checkpoints are written by the workers on their nodes and read back after a restart
    anywhere, and the driver gathers the records, so every node must see the same folder:
    s3://, gs://, or a path that is the same NFS mount on each node. A marker written here is
    looked for by a task pinned to every node; one node that misses it is enough to refuse."""
    if "://" in storage_path:
        return
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    storage = RunStorage(storage_path, ".")
    marker = f".shared-{uuid.uuid4().hex}"
    storage.write_bytes(marker, b"shared storage probe")
    try:
        probe = ray.remote(num_cpus=0)(_path_exists)
        seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(storage.path(marker)) for n in nodes])
    finally:
        storage.delete(marker)
    blind = [n["NodeManagerAddress"] + " " + n["NodeID"][:8] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise ConfigError("ray.storage_path", (
            f"{storage_path!r} is a local folder that {len(blind)} of the cluster's {len(nodes)} "
            f"nodes cannot see ({', '.join(blind)}). On a multi-node cluster, checkpoints and records "
            "must go to storage every node shares: s3://bucket/prefix, gs://bucket/prefix, or an NFS "
            "mount at the same path on every node."))


def workers_that_fit(per_worker: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many workers reserving `per_worker` the nodes (their total resources) can hold at once."""
    needed = {name: amount for name, amount in per_worker.items() if amount > 0}
    if not needed:
        return 10**9
    return sum(int(min(node.get(name, 0.0) / amount + 1e-9 for name, amount in needed.items())) for node in nodes)


def check_placement(cfg: ExperimentConfig, per_worker: dict[str, float], nodes: list[dict[str, float]],
                    fixed_size: bool) -> None:
    """All K·M workers start together (Ray Train's placement group). On a fixed-size instance,
    more than fit is an error before any worker starts; on a cluster an autoscaler may grow,
    it is a warning that says what is pending."""
    workers = cfg.num_peers * cfg.ray.workers_per_peer
    fit = workers_that_fit(per_worker, nodes)
    if fit >= workers:
        return
    have = ", ".join(f"{n.get('CPU', 0):g} CPU" + (f" + {n['GPU']:g} GPU" if n.get("GPU") else "") for n in nodes) or "no node"
    asked = f"{cfg.num_peers} peers × {cfg.ray.workers_per_peer} worker(s), each reserving {per_worker}"
    if fixed_size:
        raise ConfigError("ray.resources_per_peer", (
            f"{asked}, but this Ray instance ({have}) holds {fit} such workers at once and cannot grow. "
            "Choose: fewer peers; ray.resources_per_peer with less per peer (e.g. {CPU: 0.5}); --backend local "
            "(peers as threads); or a cluster (--address) with room or an autoscaler."))
    logger.warning("%s; the cluster's nodes (%s) hold %d such workers now. The run waits until an autoscaler "
                   "adds nodes (the workers are pending until then).", asked, have, fit)


def check_placement_per_peer(cfg: ExperimentConfig, cluster: dict[str, float], nodes: list[dict[str, float]],
                             fixed_size: bool) -> None:
    """Peers that each have a Ray Train run of their own (peers apart) are placed one run at a
    time. On a cluster (which an autoscaler may grow), a peer that does not fit beside the ones before it starts when there is room (a late
    joiner; the others train without it until then), said in a warning. On a fixed-size
    instance nobody adds room, so the peers must fit at once: an error before any starts."""
    free = [dict(node) for node in nodes]
    for k in range(cfg.num_peers):
        per_worker, workers = resources_per_worker(cfg, cluster, k), cfg.workers_of(k)
        for _ in range(workers):
            node = next((n for n in free if all(n.get(r, 0.0) + 1e-9 >= a for r, a in per_worker.items() if a > 0)), None)
            if node is None:
                asked = f"peer {k}'s {workers} worker(s), each reserving {per_worker},"
                if fixed_size:
                    raise ConfigError(f"peers.{k}.workers", (
                        f"{asked} do not fit beside the peers before it on this Ray instance, which cannot grow. "
                        f"Choose fewer workers, less per peer (peers.{k}.resources or ray.resources_per_peer, "
                        "e.g. {CPU: 0.5}), or a cluster (--address) with room or an autoscaler."))
                logger.warning("%s do not fit beside the peers before it on the cluster now: it starts when there is "
                               "room (the others train without it until then)", asked)
                return
            for r, a in per_worker.items():
                node[r] = node.get(r, 0.0) - a
