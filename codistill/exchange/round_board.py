"""Codistillation's round boards on Ray: where peers publish a payload once per round and read
each other's newest publications (the `PeriodicExchange` of peers in Ray workers).

A board is an actor that keeps each peer's newest rounds; a peer's handle on it is
`ObjectStorePeriodicExchange` (one `ray.put` or one value per publication, references passed in
lists so the actor does not resolve them, the wait done inside the actor: no polling). Two
boards, for the two ways peers fail:

- `GroupRoundBoard`: the peers live and die together (one Ray Train run). A restarted group
  `join`s first; completing the join starts a new generation and forgets every round published
  before, so a round from before a crash is never served as new after the restart.
- `LastingRoundBoard`: each peer restarts alone (its own Ray Train run), and the board outlives
  them all as their only shared state. A join never waits for the others. A reader waits for a
  peer at most `timeout` once; from then on that peer is away for it — not waited for again,
  used again as soon as it has a usable round — so a crashed, restarting or not yet started
  peer costs the others one wait, not one per round. A peer that comes back (`rejoin`) first
  drops the rounds it published at or after the one it starts from: they came from a training
  its restart threw away, and it publishes them again. Rounds are stored by value: a round must
  outlive the worker that published it (an object dies with the worker that put it).
"""

from __future__ import annotations

import asyncio

import ray

from codistill.exchange.base import PeriodicExchange, keep_newest_rounds, payload_bytes, pick_round
from codistill.exchange.object_store import PeerGroupGenerations


class _Rounds(PeerGroupGenerations):
    """What both boards do: keep each peer's newest rounds and answer for the newest usable one."""

    leaves_out_the_away = False
    """Whether a reader that waited for a peer once stops waiting for it (peers that restart alone)."""

    def __init__(self, num_peers: int):
        super().__init__(num_peers)
        self.published: dict[int, dict[int, ray.ObjectRef]] = {}
        self.away: set[tuple[int, int]] = set()  # (reader, peer): the reader stopped waiting for it
        self.changed = asyncio.Condition()

    def forget(self) -> None:
        self.published.clear()
        self.away.clear()

    async def publish(self, generation: int, round_id: int, peer: int, boxed_ref: list, keep: int = 0,
                      rejoin: bool = False) -> None:
        if generation != self.generation:
            raise RuntimeError(f"peer {peer} publishes in generation {generation}, the coordinator is in {self.generation}")
        entry = boxed_ref[0]
        ref = entry if isinstance(entry, ray.ObjectRef) else ray.put(entry)  # by value: the board owns it
        async with self.changed:
            rounds = self.published.setdefault(peer, {})
            if rejoin:
                for later in [r for r in rounds if r >= round_id]:
                    del rounds[later]
            rounds[round_id] = ref
            keep_newest_rounds(rounds, round_id, keep)
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
            if (reader, peer) not in self.away:
                try:
                    await asyncio.wait_for(self.changed.wait_for(settled), timeout)
                except asyncio.TimeoutError:
                    if self.leaves_out_the_away:
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


@ray.remote(num_cpus=0)
class GroupRoundBoard(_Rounds):
    """The round board of peers that live and die together (see the module's docstring)."""


@ray.remote(num_cpus=0)
class LastingRoundBoard(_Rounds):
    """The round board of peers that each restart alone (see the module's docstring)."""

    leaves_out_the_away = True

    async def join(self, peer: int) -> int:
        return self.generation  # never waits for the others: they start and restart on their own


class ObjectStorePeriodicExchange(PeriodicExchange):
    """A peer's handle on a group's round board (`GroupRoundBoard`)."""

    def __init__(self, board: "ray.actor.ActorHandle", peer: int):
        self.board = board
        self.generation = ray.get(board.join.remote(peer))
        self.rejoin = True  # this process's first publication replaces what a lost training published

    def _put(self, payload) -> list:
        """The payload as it goes to the board: a reference (this worker's object; the group dies
        with it anyway)."""
        return [ray.put(payload)]

    def round_trip(self, round_id, peer, payload, others, min_round, max_round, timeout, keep=0):
        answers = ray.get(self.board.round_trip.remote(self.generation, round_id, peer, self._put(payload), others,
                                                      min_round, max_round, timeout, keep, self.rejoin))
        self.rejoin = False
        found = {p: a for p, a in answers.items() if a is not None}
        fetched = ray.get([boxed[0] for _, boxed in found.values()])  # every peer's block at once
        payloads = {p: (found[p][0], value) for p, value in zip(found, fetched)}
        return payload_bytes(payload), {p: payloads.get(p) for p in others}


class LastingRoundHandle(ObjectStorePeriodicExchange):
    """A peer's handle on the `LastingRoundBoard` of peers that each restart alone: what it
    publishes outlives it, and the board keeps what a restart of it reads again."""

    weights_from_newer_rounds = True

    def _put(self, payload) -> list:
        # The payload itself, which the board stores as its own object: a round must outlive the
        # peer that published it, so the others keep distilling from it while that peer is away.
        return [payload]

    def rounds_kept_for_restart(self, period: int, checkpoint_span: int) -> int:
        # A peer restarts from its newest complete checkpoint, up to a span back, or from the one
        # before when it died while writing that one: two spans of rounds it reads again.
        return 2 * -(-checkpoint_span // period)
