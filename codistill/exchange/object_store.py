"""Both exchanges through the Ray object store, for peers outside one process group.

Every step (`ObjectStoreExchange`): each peer `ray.put`s its payload once and hands the
reference to a small coordinating actor (`GatherCoordinator`); the actor answers each peer, in
one round trip, with the references of all peers once the call is complete, and each peer then fetches the others' objects directly
from the object store. The references travel wrapped in a list so that Ray passes them on
instead of resolving them inside the actor. The actor waits on asyncio events: no polling.

Restarts: when Ray Train restarts the workers after a failure, the new workers `join` first.
A join completes once every peer has joined, and starts a new generation that discards every
call or round of the old one, so nothing half-finished from before the crash is served as new.

Per round (codistillation) the peers meet on a round board instead: `round_board.py`.
"""

from __future__ import annotations

import asyncio

import ray
from codistill.exchange.base import Exchange, Payload


class PeerGroupGenerations:
    """The join protocol both coordinators share: a join completes once every worker it serves
    has joined — each of the `workers_per_peer` replicas of each peer, where they all meet on one
    coordinator (a group's round board) — then the coordinator forgets everything (`forget`) and
    starts a new generation."""

    def __init__(self, num_peers: int, workers_per_peer: int = 1):
        self.num_peers = num_peers
        self.members = num_peers * workers_per_peer
        self.generation = 0
        self.joining: set[tuple[int, int]] = set()
        self.joined = asyncio.Event()

    def forget(self) -> None:
        raise NotImplementedError

    async def join(self, peer: int, replica: int = 0) -> int:
        # A replacement worker of the same place counts once. Counting peers alone, the replicas
        # of one group's peers completed a join among the first K of them and left the others
        # waiting in the next one (one_group codistillation with workers_per_peer > 1 hung).
        self.joining.add((peer, replica))
        joined = self.joined
        if len(self.joining) == self.members:
            self.generation += 1
            self.forget()
            self.joining = set()
            self.joined = asyncio.Event()
            joined.set()
        await joined.wait()
        return self.generation


@ray.remote(num_cpus=0)
class GatherCoordinator(PeerGroupGenerations):
    def __init__(self, num_peers: int):
        super().__init__(num_peers)
        self.calls: dict[tuple[int, int], dict[int, ray.ObjectRef]] = {}
        self.complete: dict[tuple[int, int], asyncio.Event] = {}
        self.served: dict[tuple[int, int], int] = {}

    def forget(self) -> None:
        self.calls.clear()
        self.complete.clear()
        self.served.clear()

    async def exchange(self, generation: int, call: int, peer: int, boxed_ref: list) -> list:
        if generation != self.generation:
            raise RuntimeError(f"peer {peer} is in exchange generation {generation}, the coordinator in {self.generation}")
        key = (generation, call)
        published = self.calls.setdefault(key, {})
        event = self.complete.setdefault(key, asyncio.Event())
        published[peer] = boxed_ref[0]
        if len(published) == self.num_peers:
            event.set()
        await event.wait()
        refs = [published[p] for p in range(self.num_peers)]
        self.served[key] = self.served.get(key, 0) + 1
        if self.served[key] == self.num_peers:  # everyone has its answer: forget the call
            self.calls.pop(key, None)
            self.complete.pop(key, None)
            self.served.pop(key, None)
        return refs


class ObjectStoreExchange(Exchange):
    def __init__(self, coordinator: "ray.actor.ActorHandle", peer: int, num_peers: int):
        self.coordinator = coordinator
        self.peer = peer
        self.num_peers = num_peers
        self.generation: int | None = None
        self.calls = 0

    def all_gather(self, payload: Payload) -> list[Payload]:
        if self.generation is None:
            self.generation = ray.get(self.coordinator.join.remote(self.peer))
        ref = ray.put({name: t.detach().cpu() for name, t in payload.items()})
        refs = ray.get(self.coordinator.exchange.remote(self.generation, self.calls, self.peer, [ref]))
        self.calls += 1
        fetched = iter(ray.get([r for p, r in enumerate(refs) if p != self.peer]))
        own = {name: t.detach() for name, t in payload.items()}
        device = next(iter(payload.values())).device
        return [own if p == self.peer else {n: t.to(device) for n, t in next(fetched).items()}
                for p in range(self.num_peers)]
