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
  its restart threw away, and it publishes them again. A round must outlive the worker that
  published it (an object dies with the worker that put it), so the board owns it: by value in
  its node's object store while the peer's rounds fit the board's share of
  `exchange.round_board_mb`, else as a `RoundSnapshot` — the round written once to the run's
  storage by its publisher (`exchange/snapshots.py`), of which the board holds the path.

A sharded peer's round comes in M pieces, one from each of its workers (its rows of predictions,
its shard of weights): it is readable once all M are in, a reader fetches the pieces it needs
(`pieces_wanted`: its own alone where it is cut alike), and a restarted peer's pieces are never
completed with those of the training it lost.

Both boards remember, per reader and round, which round of each peer they served (`served`), and
pin those rounds: a peer that restarts from a checkpoint and asks for a round again reads exactly
the rounds it read before — not the newer ones published since — so a resumed peer trains as it
would have; a round number its publisher threw away and published again is read as published now.
"""

from __future__ import annotations

import asyncio
import logging

import ray

from codistill.exchange.base import (KEEP_ROUNDS, PeriodicExchange, Piece, Pieces, keep_newest_rounds, payload_bytes,
                                     pick_round, pieces_wanted)
from codistill.exchange.object_store import PeerGroupGenerations
from codistill.exchange.snapshots import RoundSnapshot, write_snapshot
from codistill.storage import RunStorage

logger = logging.getLogger(__name__)


def rounds_held_at_most(keep: int, num_peers: int) -> int:
    """The most rounds of one peer a board holds: its newest `keep`, and those that each other
    peer's record of what it read pins (at most `keep` rounds of it too)."""
    return num_peers * keep


class _Rounds(PeerGroupGenerations):
    """What both boards do: keep each peer's newest rounds and answer for the newest usable one."""

    leaves_out_the_away = False
    """Whether a reader that waited for a peer once stops waiting for it (peers that restart alone)."""

    def __init__(self, num_peers: int, memory_bytes: int | None = None, workers_per_peer: int = 1):
        super().__init__(num_peers, workers_per_peer)
        self.published: dict[int, dict[int, list[ray.ObjectRef | RoundSnapshot]]] = {}  # peer → round → its pieces
        self.pending: dict[int, dict[int, dict[int, tuple]]] = {}  # peer → round → piece → (entry, bytes, rejoin)
        self.by_value: dict[int, dict[int, int]] = {}  # peer → round → bytes the board holds of it
        self.memory_bytes = memory_bytes  # the bound on what it holds by value (None: it holds references only)
        self.served: dict[int, dict[int, dict[int, int | None]]] = {}  # reader → its round → {peer: round read}
        self.away: set[tuple[int, int]] = set()  # (reader, peer): the reader stopped waiting for it
        self.changed = asyncio.Condition()

    def forget(self) -> None:
        self.published.clear()
        self.pending.clear()
        self.by_value.clear()
        self.served.clear()
        self.away.clear()

    def _pinned(self, peer: int) -> frozenset[int]:
        return frozenset(read[peer] for reads in self.served.values() for read in reads.values()
                         if read.get(peer) is not None)

    async def publish(self, generation: int, round_id: int, peer: int, boxed_ref: list, keep: int = 0,
                      rejoin: bool = False, piece: int = 0, pieces: int = 1) -> None:
        """Piece `piece` of `pieces` of `peer`'s round `round_id` (the M workers of a sharded peer
        each publish their own); the round is readable once all its pieces are in."""
        if generation != self.generation:
            raise RuntimeError(f"peer {peer} publishes in generation {generation}, the coordinator is in {self.generation}")
        if not boxed_ref:
            return  # a replica of a peer whose first replica publishes: it only reads
        entry, size = boxed_ref[0], 0
        if not isinstance(entry, (ray.ObjectRef, RoundSnapshot)):
            entry, size = ray.put(entry), payload_bytes(entry)  # by value: the board owns it
        dropped = []
        async with self.changed:
            rounds = self.published.setdefault(peer, {})
            pending = self.pending.setdefault(peer, {})
            if rejoin:  # what a lost training published from round_id on (pieces this restart sent stay)
                dropped += [rounds.pop(r) for r in [r for r in rounds if r >= round_id]]
                for r in [r for r in pending if r >= round_id]:
                    fresh = {i: p for i, p in pending[r].items() if p[2]}
                    dropped += [p[0] for i, p in pending.pop(r).items() if i not in fresh]
                    if fresh:
                        pending[r] = fresh
            parts = pending.setdefault(round_id, {})
            if piece in parts:
                dropped.append(parts[piece][0])
            parts[piece] = (entry, size, rejoin)
            complete = len(parts) == pieces
            if complete:
                del pending[round_id]
                if round_id in rounds:
                    dropped.append(rounds.pop(round_id))
                rounds[round_id] = [parts[i][0] for i in range(pieces)]
                dropped += keep_newest_rounds(rounds, round_id, keep, self._pinned(peer))
                for old in [r for r in pending if r <= round_id - (keep or KEEP_ROUNDS)]:  # pieces never completed
                    dropped += [p[0] for p in pending.pop(old).values()]
                held = self.by_value.setdefault(peer, {})
                held[round_id] = sum(p[1] for p in parts.values())
                for gone in [r for r in held if r not in rounds]:
                    del held[gone]
                self.changed.notify_all()
        for snapshot in [e for entries in dropped for e in (entries if isinstance(entries, list) else [entries])]:
            if isinstance(snapshot, RoundSnapshot):  # off the event loop: a delete on s3 is a request
                asyncio.get_running_loop().run_in_executor(None, snapshot.delete)
        if not complete:
            return
        if self.memory_bytes is not None and sum(held.values()) > self.memory_bytes / self.num_peers:
            raise RuntimeError(f"the round board holds {sum(held.values())} bytes of peer {peer}'s rounds, above its "
                               f"share {self.memory_bytes / self.num_peers:.0f} of exchange.round_board_mb")

    async def newest(self, generation: int, peer: int, min_round: int, max_round: int | None, timeout: float,
                     reader: int = -1, for_round: int | None = None):
        """`peer`'s newest round in [min_round, max_round] for `reader`'s round `for_round` — or
        the round it was served for that round before, when it asks again (it restarted)."""
        reads = self.served.setdefault(reader, {}).setdefault(for_round, {}) if for_round is not None else {}
        if peer in reads and (reads[peer] is None or reads[peer] in self.published.get(peer, {})):
            read = reads[peer]
            return None if read is None else (read, self.published[peer][read])

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
            # Another worker of this reader's peer (a sharded peer's) may have been answered while
            # this one waited: all of them distil from the same round, or from none.
            found = reads[peer] if peer in reads else usable()
            reads[peer] = found
            if found is None:
                return None
            self.away.discard((reader, peer))
            return found, self.published[peer][found]

    async def round_trip(self, generation: int, round_id: int, peer: int, boxed_ref: list, others: list[int],
                         min_round: int, max_round: int | None, timeout: float, keep: int = 0,
                         rejoin: bool = False, piece: int = 0, pieces: int = 1) -> dict:
        """`publish`, then `newest` of each other peer (waiting for them together): one call a round."""
        await self.publish(generation, round_id, peer, boxed_ref, keep, rejoin, piece, pieces)
        found = await asyncio.gather(*[self.newest(generation, other, min_round, max_round, timeout, reader=peer,
                                                   for_round=round_id) for other in others])
        reads = self.served.get(peer, {})
        for old in [r for r in reads if r <= round_id - (keep or KEEP_ROUNDS)]:  # what a restart reads again
            del reads[old]
        return dict(zip(others, found))

    def state(self) -> dict:
        return {"generation": self.generation, "rounds": {p: sorted(r) for p, r in self.published.items()},
                "away": sorted(self.away)}

    def bytes_by_value(self) -> int:
        """The payload bytes of the rounds this board holds in its object store."""
        return sum(sum(held.values()) for held in self.by_value.values())


@ray.remote(num_cpus=0)
class GroupRoundBoard(_Rounds):
    """The round board of peers that live and die together (see the module's docstring)."""


@ray.remote(num_cpus=0)
class LastingRoundBoard(_Rounds):
    """The round board of peers that each restart alone (see the module's docstring)."""

    leaves_out_the_away = True

    async def join(self, peer: int, replica: int = 0) -> int:
        return self.generation  # never waits for the others: they start and restart on their own


class ObjectStorePeriodicExchange(PeriodicExchange):
    """A peer's handle on a group's round board (`GroupRoundBoard`)."""

    def __init__(self, board: "ray.actor.ActorHandle", peer: int, replica: int = 0):
        self.board = board
        self.generation = ray.get(board.join.remote(peer, replica))
        self.rejoin = True  # this process's first publication replaces what a lost training published

    def _put(self, round_id: int, payload, keep: int, pieces: int) -> list:
        """The payload as it goes to the board: a reference (this worker's object; the group dies
        with it anyway)."""
        return [ray.put(payload)]

    def round_trip(self, round_id, peer, payload, others, min_round, max_round, timeout, keep=0, piece=None):
        piece = piece or Piece()
        boxed = [] if payload is None else self._put(round_id, payload, keep or KEEP_ROUNDS, piece.count)
        answers = ray.get(self.board.round_trip.remote(self.generation, round_id, peer, boxed, others, min_round,
                                                      max_round, timeout, keep, self.rejoin, piece.index, piece.count))
        self.rejoin = False
        # Of each publication the pieces this worker needs: its own alone where the publisher's
        # pieces are cut as this worker's are, else all of them (`pieces_wanted`).
        wanted = {p: (answer[0], answer[1], pieces_wanted(len(answer[1]), piece))
                  for p, answer in answers.items() if answer is not None}
        refs = [(p, i) for p, (_, entries, want) in wanted.items() for i in want
                if isinstance(entries[i], ray.ObjectRef)]
        fetched = dict(zip(refs, ray.get([wanted[p][1][i] for p, i in refs])))  # every object at once
        payloads = {}
        for p, (r, entries, want) in wanted.items():
            parts = {i: fetched[p, i] if (p, i) in fetched else _read(entries[i], p, r) for i in want}
            if all(v is not None for v in parts.values()):
                payloads[p] = (r, parts[0] if len(entries) == 1 else Pieces(len(entries), parts))
        return payload_bytes(payload), {p: payloads.get(p) for p in others}


def _read(snapshot: RoundSnapshot, peer: int, round_id: int):
    try:
        return snapshot.read()
    except Exception as err:  # noqa: BLE001 — dropped under the reader (its publisher restarted): none this round
        logger.warning("peer %d's round %d could not be read (%s): distilling without it this round", peer, round_id, err)
        return None


class LastingRoundHandle(ObjectStorePeriodicExchange):
    """A peer's handle on the `LastingRoundBoard` of peers that each restart alone: what it
    publishes outlives it, and the board keeps what a restart of it reads again.

    A round goes to the board by value while every round of this peer the board may hold
    (`rounds_held_at_most`) fits the board's share (`memory_bytes` / peers); otherwise it is
    written once to the run's storage and the board holds its `RoundSnapshot` — a piece of a
    sharded peer's round each by its own worker, as its own snapshot. Which workers of a peer
    publish is the signal source's choice (`engine/stale_peers.py`): a data-parallel peer's first
    replica, each worker of a sharded one."""

    weights_from_newer_rounds = True

    def __init__(self, board: "ray.actor.ActorHandle", peer: int, num_peers: int, storage: RunStorage,
                 memory_bytes: int):
        super().__init__(board, peer)
        self.peer = peer
        self.num_peers = num_peers
        self.storage = storage
        self.memory_bytes = memory_bytes

    def _put(self, round_id, payload, keep, pieces) -> list:
        nbytes = payload_bytes(payload)
        if pieces * nbytes * rounds_held_at_most(keep, self.num_peers) <= self.memory_bytes / self.num_peers:
            # The payload itself, which the board stores as its own object: a round must outlive
            # the peer that published it, so the others keep distilling from it while it is away.
            return [payload]
        return [write_snapshot(self.storage, self.peer, round_id, payload, nbytes)]

    def rounds_kept_for_restart(self, period: int, checkpoint_span: int) -> int:
        # A peer restarts from its newest complete checkpoint, up to a span back, or from the one
        # before when it died while writing that one: two spans of rounds it reads again.
        return 2 * -(-checkpoint_span // period)
