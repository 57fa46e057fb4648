"""The workers as a mesh (`engine/mesh.py`): K peers × M replicas checked once against the world
size, each rank's coordinates, its slice of the batch, and — over a real gloo group of four
processes — the device mesh's two dimensions: DDP's replicas and the exchange's peers."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codistill.engine.mesh import PeerMesh
from codistill.errors import RunError


def test_a_world_of_another_size_is_refused_naming_both_numbers():
    mesh = PeerMesh(3, 2)
    mesh.check(6)
    with pytest.raises(RunError, match=r"3 peers × 2 replicas needs 6 workers, but the world has 4"):
        mesh.check(4)


def test_a_mesh_without_peers_or_replicas_is_refused():
    with pytest.raises(ValueError, match="0 × 2"):
        PeerMesh(0, 2)


def test_rank_r_is_replica_r_mod_m_of_peer_r_div_m():
    mesh = PeerMesh(3, 2)
    assert [mesh.coordinates(r) for r in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    with pytest.raises(RunError, match="rank 6 is outside"):
        mesh.coordinates(6)


def test_each_replica_takes_its_slice_of_the_batch_and_together_the_whole():
    batch = torch.arange(12)
    mesh = PeerMesh(2, 3)
    slices = [mesh.place(0, r).batch_slice(batch) for r in range(3)]
    assert [s.tolist() for s in slices] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert mesh.place(0, 1).is_leader is False and mesh.place(1, 0).is_leader
    one = PeerMesh(4).place(2)  # the local runner's: one replica, no device mesh
    assert one.batch_slice(batch) is batch and one.replica_group is None and one.peer_group is None
    network = torch.nn.Linear(2, 2)
    assert one.replicated(network, torch.device("cpu")) is network


def _build(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4)
    try:
        place = PeerMesh(2, 2).build(torch.device("cpu"))
        seen = {"coordinates": (place.peer, place.replica),
                "replica_group": dist.get_process_group_ranks(place.replica_group),
                "peer_group": dist.get_process_group_ranks(place.peer_group)}
        torch.save(seen, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # four processes: the full tier
def test_the_device_mesh_gives_ddp_the_peers_replicas_and_the_exchange_one_replica_of_every_peer(tmp_path):
    out = str(tmp_path / "seen")
    mp.spawn(_build, args=(str(tmp_path / "init"), out), nprocs=4, join=True)
    seen = [torch.load(f"{out}.{r}") for r in range(4)]
    assert [s["coordinates"] for s in seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [s["replica_group"] for s in seen] == [[0, 1], [0, 1], [2, 3], [2, 3]]  # DDP: a peer's replicas
    assert [s["peer_group"] for s in seen] == [[0, 2], [1, 3], [0, 2], [1, 3]]  # exchange: replica m of each peer
