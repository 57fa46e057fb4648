"""How peers see each other: two interfaces, each with a local and a Ray transport.

- `Exchange`: every step, every peer hands in its payload and gets every peer's (an
  all-gather; DML, ONE across peers, AT between peers). Transports: `local.LocalExchange`
  (threads), `collective.CollectiveExchange` (torch.distributed), `object_store.ObjectStoreExchange`.
- `PeriodicExchange`: once per round a peer publishes a payload and takes each other peer's
  newest publication, waiting only when it is too stale (codistillation). Transports:
  `local.LocalPeriodicExchange`, `round_board.ObjectStorePeriodicExchange` (Ray's round boards).

A payload is named tensors, `{"logits": …, "attention.conv2": …}` (or, for periodic weights,
a state dict); how it is packed to travel is the transport's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Payload = dict[str, torch.Tensor]


class Exchange:
    """Every peer calls `all_gather(payload)` in the same order; each call returns the K peers'
    payloads indexed by peer (the caller's own included). Every peer sends the same names;
    shapes may differ between peers (peers of different architectures)."""

    num_peers: int
    peer: int

    def all_gather(self, payload: Payload) -> list[Payload]:
        raise NotImplementedError


class PeriodicExchange:
    """One peer's handle on the round publications of its group."""

    weights_from_newer_rounds: bool = False
    """Whether weights published rounds ahead of the reader's serve it: where each peer restarts
    on its own, a peer that fell behind (it restarted, or joined late) distils from the others'
    newest weights; where peers live and die together, none falls behind."""

    def rounds_kept_for_restart(self, period: int, checkpoint_span: int) -> int:
        """The rounds of a peer kept beyond what its readers need in step (at most max_staleness
        behind), so that a peer that restarts on its own reads again what it read: none where
        the peers restart together (the group forgets every round)."""
        return 0

    def publish(self, round_id: int, peer: int, payload, keep: int = 0) -> int:
        """Publish this peer's payload of round `round_id`; returns the number of bytes sent.
        `keep`: how many of the peer's newest rounds stay readable (0: `KEEP_ROUNDS`)."""
        raise NotImplementedError

    def newest(self, peer: int, min_round: int, max_round: int | None, timeout: float) -> tuple[int, object] | None:
        """(round, payload) of `peer`'s newest publication with min_round ≤ round ≤ max_round,
        or None when none arrived within `timeout` seconds. (A peer that is ahead may already
        have published rounds after max_round: those cover batches this peer has not reached.
        max_round None: any newer round will do — a peer's newer weights are still its weights.)"""
        raise NotImplementedError

    def round_trip(self, round_id: int, peer: int, payload, others: list[int], min_round: int,
                   max_round: int | None, timeout: float, keep: int = 0,
                   piece: "Piece | None" = None) -> tuple[int, dict[int, tuple[int, object] | None]]:
        """A round's whole exchange: publish `payload` (None: nothing, this worker only reads),
        then each of `others`' newest publication in [min_round, max_round] (None for a peer that
        sent none within `timeout`). Returns (bytes sent, {peer: (round, payload) or None}); a
        publication in pieces arrives as `Pieces`. A transport over the network does it in one
        request. `piece`: which piece of its peer's publication this worker's is (transports
        whose workers are one per peer — the local one — have only whole publications)."""
        sent = 0 if payload is None else self.publish(round_id, peer, payload, keep)
        return sent, {other: self.newest(other, min_round, max_round, timeout) for other in others}


@dataclass(frozen=True)
class Piece:
    """A worker's piece of its peer's round publication: piece `index` of `count` (the M workers of
    a sharded peer each publish their own shard, or their own rows). `alone`: whether, of another
    peer's publication in as many pieces, this worker can use its own index alone — its shard of
    weights sharded alike, its rows of predictions — rather than all of them."""

    index: int = 0
    count: int = 1
    alone: bool = False


@dataclass
class Pieces:
    """A publication that came in `count` pieces, of which the reader fetched `parts` (index → payload):
    its own piece alone, or all of them."""

    count: int
    parts: dict[int, object] = field(default_factory=dict)


def pieces_wanted(count: int, reader: Piece) -> list[int]:
    """Which of a publication's `count` pieces `reader` fetches."""
    return [reader.index] if reader.alone and reader.count == count else list(range(count))


# Rounds kept per peer unless the publisher says how many its readers can still use: a peer is
# at most max_staleness rounds ahead of another, so 2·max_staleness + 2 rounds always suffice
# (a language model's round of predictions can be hundreds of MB).
KEEP_ROUNDS = 8


def keep_newest_rounds(rounds: dict[int, object], round_id: int, keep: int = 0,
                       pinned: frozenset[int] = frozenset()) -> list:
    """Drop a peer's rounds that no reader can use once it published `round_id`: all but the
    newest `keep` (0: `KEEP_ROUNDS`) and those `pinned` (a reader that restarts reads them
    again). One rule for every transport that keeps rounds. Returns what was dropped."""
    return [rounds.pop(old) for old in [r for r in rounds if r <= round_id - (keep or KEEP_ROUNDS) and r not in pinned]]


def pick_round(published: dict[int, object], min_round: int, max_round: int | None) -> int | None:
    """The newest round in [min_round, max_round] (max_round None: no upper bound)."""
    usable = [r for r in published if min_round <= r and (max_round is None or r <= max_round)]
    return max(usable) if usable else None


def payload_bytes(payload) -> int:
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, dict):
        return sum(payload_bytes(v) for v in payload.values())
    return 0
