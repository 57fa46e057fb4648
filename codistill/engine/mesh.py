"""The workers as a mesh: K peers × M data-parallel workers (replicas) each is one value,
`PeerMesh`, checked once against the world size and built as a 2-D device mesh named
("peer", "replica"), as torchtitan's `ParallelDims` builds its meshes. World rank r sits at
(peer r // M, replica r % M); everyone else asks the mesh instead of doing rank arithmetic:

- the replica dimension (the M workers of one peer) is what DDP averages gradients over, or
  what FSDP shards the peer over (`train.sharding`, `engine/sharding.py`);
- the peer dimension (replica m of every peer: they hold the same slice of the batch) is what
  the every-step exchange gathers over;
- a worker's slice of the batch every peer shares is `MeshPlace.batch_slice`.

The local runner's peers are threads without a process group: its mesh is the trivial value
(peers=K, replicas=1) and builds no device mesh.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from codistill.errors import RunError

DIMS = ("peer", "replica")


@dataclass(frozen=True)
class PeerMesh:
    peers: int
    replicas: int = 1

    def __post_init__(self):
        if self.peers < 1 or self.replicas < 1:
            raise ValueError(f"a mesh has at least one peer and one replica, got {self.peers} × {self.replicas}")

    @property
    def world_size(self) -> int:
        return self.peers * self.replicas

    def check(self, world_size: int) -> None:
        """The one check that the workers started are the workers the mesh lays out."""
        if world_size != self.world_size:
            raise RunError(f"the mesh of {self.peers} peers × {self.replicas} replicas needs {self.world_size} "
                           f"workers, but the world has {world_size}")

    def coordinates(self, rank: int) -> tuple[int, int]:
        """(peer, replica) of world rank `rank`."""
        if not 0 <= rank < self.world_size:
            raise RunError(f"rank {rank} is outside the mesh of {self.peers} peers × {self.replicas} replicas")
        return divmod(rank, self.replicas)

    def place(self, peer: int, replica: int = 0) -> MeshPlace:
        """A worker's place without a device mesh (the local runner's threads, benchmarks)."""
        return MeshPlace(self, peer, replica)

    def build(self, device: torch.device) -> MeshPlace:
        """This process's place in the mesh over the initialised default process group (a Ray
        Train worker's): the world size checked, the 2-D device mesh built (every rank builds
        it, as torch.distributed requires of every group)."""
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():  # a lone worker without a process group: nothing to build
            self.check(1)
            return self.place(0)
        self.check(dist.get_world_size())
        peer, replica = self.coordinates(dist.get_rank())
        device_mesh = init_device_mesh(device.type, (self.peers, self.replicas), mesh_dim_names=DIMS)
        return MeshPlace(self, peer, replica, device_mesh)


@dataclass(frozen=True)
class MeshPlace:
    """One worker's place in its `PeerMesh`: its coordinates, and its groups of the device mesh
    (None without one). A dimension that holds this worker alone still has its group: one peer's
    exchange gathers over it, not over the world of its replicas."""

    mesh: PeerMesh
    peer: int
    replica: int = 0
    device_mesh: object | None = None

    @property
    def replicas(self) -> int:
        return self.mesh.replicas

    @property
    def is_leader(self) -> bool:
        """The replica that writes its peer's checkpoint and records."""
        return self.replica == 0

    def _group(self, dim: str):
        if self.device_mesh is None:
            return None
        return self.device_mesh.get_group(dim)

    @property
    def replica_group(self):
        """The process group DDP averages this peer's gradients over (its M replicas)."""
        return self._group("replica")

    @property
    def replica_mesh(self):
        """The 1-D device mesh of this peer's M replicas: what FSDP shards the peer over."""
        return self.device_mesh["replica"] if self.device_mesh is not None else None

    @property
    def peer_group(self):
        """The process group the every-step exchange gathers over (this replica of every peer)."""
        return self._group("peer")

    def batch_slice(self, t: torch.Tensor) -> torch.Tensor:
        """This replica's slice of a batch (or of a payload row-aligned with it)."""
        return t if self.replicas == 1 else t.chunk(self.replicas)[self.replica]

    def replicated(self, network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """What the forward pass of training runs: `network` itself, or — with several replicas
        — its DDP wrapper over the replica dimension (gradients averaged across the replicas)."""
        if self.replicas == 1:
            return network
        return torch.nn.parallel.DistributedDataParallel(network, process_group=self.replica_group,
                                                         device_ids=[device.index] if device.type == "cuda" else None)
