"""In-process transports for K peers running as threads (the local runner and tests)."""

from __future__ import annotations

import threading
import time

from codistill.exchange.base import Exchange, Payload, PeriodicExchange, keep_newest_rounds, payload_bytes, pick_round


class LocalGatherHub:
    """Shared slots plus one barrier. Two slot sets alternate between calls: a peer that
    has passed call n can only write call n+1's slots, which nobody is still reading, and it
    cannot reach call n+2 until every peer has finished reading call n."""

    def __init__(self, num_peers: int):
        self.num_peers = num_peers
        self.slots = [[None] * num_peers, [None] * num_peers]
        self.barrier = threading.Barrier(num_peers)

    def abort(self) -> None:
        """Release peers blocked in the barrier when one peer fails (they raise BrokenBarrierError)."""
        self.barrier.abort()

    def exchange_for(self, peer: int) -> "LocalExchange":
        return LocalExchange(self, peer)


class LocalExchange(Exchange):
    def __init__(self, hub: LocalGatherHub, peer: int):
        self.hub = hub
        self.peer = peer
        self.num_peers = hub.num_peers
        self.calls = 0

    def all_gather(self, payload: Payload) -> list[Payload]:
        slots = self.hub.slots[self.calls % 2]
        self.calls += 1
        slots[self.peer] = {name: t.detach() for name, t in payload.items()}
        self.hub.barrier.wait()
        return list(slots)


class LocalPublications:
    """Every peer's recent round publications, in memory, for peers running as threads."""

    def __init__(self, num_peers: int):
        self.num_peers = num_peers
        self.published: dict[int, dict[int, object]] = {}
        self.changed = threading.Condition()
        self.aborted = False

    def abort(self) -> None:
        """Release peers waiting for a publication (they get none) when the run stops."""
        with self.changed:
            self.aborted = True
            self.changed.notify_all()

    def exchange_for(self, peer: int) -> "LocalPeriodicExchange":
        return LocalPeriodicExchange(self)


class LocalPeriodicExchange(PeriodicExchange):
    def __init__(self, publications: LocalPublications):
        self.publications = publications

    def publish(self, round_id: int, peer: int, payload, keep: int = 0) -> int:
        store = self.publications
        with store.changed:
            rounds = store.published.setdefault(peer, {})
            rounds[round_id] = payload
            keep_newest_rounds(rounds, round_id, keep)
            store.changed.notify_all()
        return payload_bytes(payload)

    def newest(self, peer: int, min_round: int, max_round: int | None, timeout: float):
        store = self.publications
        deadline = time.monotonic() + timeout
        with store.changed:
            while True:
                rounds = store.published.get(peer, {})
                found = pick_round(rounds, min_round, max_round)
                if found is not None:
                    return found, rounds[found]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or store.aborted:
                    return None
                store.changed.wait(remaining)
