"""Both exchanges through the Ray object store, for peers outside one process group.

Every step (`ObjectStoreExchange`): each peer `ray.put`s its payload once and hands the
reference to a small coordinating actor (`GatherCoordinator`); the actor answers each peer, in
one round trip, with the references of all peers once the call is complete, and each peer then fetches the others' objects directly
from the object store. The references travel wrapped in a list so that Ray passes them on
instead of resolving them inside the actor. The actor waits on asyncio events: no polling.

Restarts: when Ray Train restarts the workers after a failure, the new workers `join` first.
A join completes once every peer has joined, and starts a new generation that discards every
call or round of the old one, so nothing half-finished from before the crash is served as new.

Per round (`ObjectStorePeriodicExchange`, codistillation): `PublicationCoordinator` keeps
the newest publications of each peer.
"""

from __future__ import annotations

import asyncio

import ray
from codistill.exchange.base import KEEP_ROUNDS, Exchange, Payload, PeriodicExchange, payload_bytes, pick_round


class PeerGroupGenerations:
    """The join protocol both coordinators share: a join completes once every peer has joined,
    then the coordinator forgets everything (`forget`) and starts a new generation."""

    def __init__(self, num_peers: int):
        self.num_peers = num_peers
        self.generation = 0
        self.joining: set[int] = set()
        self.joined = asyncio.Event()

    def forget(self) -> None:
        raise NotImplementedError

    async def join(self, peer: int) -> int:
        self.joining.add(peer)  # a replacement worker of the same peer counts once
        joined = self.joined
        if len(self.joining) == self.num_peers:
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


@ray.remote(num_cpus=0)
class PublicationCoordinator(PeerGroupGenerations):
    """Codistillation's round board: the newest published references of each peer.

    One group (`apart=False`): like `GatherCoordinator`, a restarted group `join`s first;
    completing a join starts a new generation and forgets every round published before, so a
    round from before a crash is never served as new after the restart.

    Peers apart (`apart=True`, each peer its own Ray Train run): the board outlives them all and
    is their only shared state. A join never waits for the others. A reader waits for a peer at
    most `timeout` once; from then on that peer is away for it — not waited for again, used
    again as soon as it has a usable round — so a crashed, restarting or not yet started peer
    costs the others one wait, not one per round. A peer that comes back (`rejoin`) first drops
    the rounds it published at or after the one it starts from: they came from a training its
    restart threw away, and it publishes them again."""

    def __init__(self, num_peers: int, apart: bool = False):
        super().__init__(num_peers)
        self.apart = apart
        self.published: dict[int, dict[int, ray.ObjectRef]] = {}
        self.away: set[tuple[int, int]] = set()  # (reader, peer): the reader stopped waiting for it
        self.changed = asyncio.Condition()

    def forget(self) -> None:
        self.published.clear()
        self.away.clear()

    async def join(self, peer: int) -> int:
        if self.apart:
            return self.generation
        return await super().join(peer)

    async def publish(self, generation: int, round_id: int, peer: int, boxed_ref: list, keep: int = 0,
                      rejoin: bool = False) -> None:
        if generation != self.generation:
            raise RuntimeError(f"peer {peer} publishes in generation {generation}, the coordinator is in {self.generation}")
        entry = boxed_ref[0]
        ref = entry if isinstance(entry, ray.ObjectRef) else ray.put(entry)  # peers apart: the board owns it
        async with self.changed:
            rounds = self.published.setdefault(peer, {})
            if rejoin:
                for later in [r for r in rounds if r >= round_id]:
                    del rounds[later]
            rounds[round_id] = ref
            for old in [r for r in rounds if r <= round_id - (keep or KEEP_ROUNDS)]:
                del rounds[old]
            self.changed.notify_all()

    async def newest(self, generation: int, peer: int, min_round: int, max_round: int | None, timeout: float,
                     reader: int = -1):
        def usable():
            return pick_round(self.published.get(peer, {}), min_round, max_round)

        def settled():
            # A usable round, or a peer already past max_round: the rounds this reader needs
            # (its batches) were published and dropped, and waiting would not bring them back.
            ahead = max_round is not None and any(r > max_round for r in self.published.get(peer, {}))
            return usable() is not None or ahead

        async with self.changed:
            if not (self.apart and (reader, peer) in self.away):
                try:
                    await asyncio.wait_for(self.changed.wait_for(settled), timeout)
                except asyncio.TimeoutError:
                    if self.apart:
                        self.away.add((reader, peer))
            found = usable()
            if found is None:
                return None
            self.away.discard((reader, peer))
            return found, [self.published[peer][found]]

    async def round_trip(self, generation: int, round_id: int, peer: int, boxed_ref: list, others: list[int],
                         min_round: int, max_round: int | None, timeout: float, keep: int = 0,
                         rejoin: bool = False) -> dict:
        """`publish`, then `newest` of each other peer (waiting for them together): one call a round."""
        await self.publish(generation, round_id, peer, boxed_ref, keep, rejoin)
        found = await asyncio.gather(*[self.newest(generation, other, min_round, max_round, timeout, reader=peer)
                                       for other in others])
        return dict(zip(others, found))

    def state(self) -> dict:
        return {"generation": self.generation, "rounds": {p: sorted(r) for p, r in self.published.items()},
                "away": sorted(self.away)}


class ObjectStorePeriodicExchange(PeriodicExchange):
    """A peer's handle on `PublicationCoordinator`: one `ray.put` per payload, references passed
    in lists (not resolved by the actor), the wait done inside the actor (no polling)."""

    def __init__(self, actor: "ray.actor.ActorHandle", peer: int, apart: bool = False):
        self.actor = actor
        self.apart = apart
        self.generation = ray.get(actor.join.remote(peer))
        self.rejoin = True  # this process's first publication replaces what a lost training published

    def _put(self, payload) -> list:
        """The payload as it goes to the board: a reference (this worker's object), or, for peers
        apart, the payload itself, which the board stores as its own object — a round must
        outlive the peer that published it, so the others keep distilling from it while that
        peer is away (an object dies with the worker that put it)."""
        return [payload] if self.apart else [ray.put(payload)]

    def publish(self, round_id: int, peer: int, payload, keep: int = 0) -> int:
        ray.get(self.actor.publish.remote(self.generation, round_id, peer, self._put(payload), keep, self.rejoin))
        self.rejoin = False
        return payload_bytes(payload)

    def newest(self, peer: int, min_round: int, max_round: int | None, timeout: float):
        answer = ray.get(self.actor.newest.remote(self.generation, peer, min_round, max_round, timeout))
        if answer is None:
            return None
        round_id, boxed = answer
        return round_id, ray.get(boxed[0])

    def round_trip(self, round_id, peer, payload, others, min_round, max_round, timeout, keep=0):
        answers = ray.get(self.actor.round_trip.remote(self.generation, round_id, peer, self._put(payload), others, min_round,
                                                      max_round, timeout, keep, self.rejoin))
        self.rejoin = False
        found = {p: a for p, a in answers.items() if a is not None}
        fetched = ray.get([boxed[0] for _, boxed in found.values()])  # every peer's block at once
        payloads = {p: (found[p][0], value) for p, value in zip(found, fetched)}
        return payload_bytes(payload), {p: payloads.get(p) for p in others}
