"""Round boards: periodic, bounded-staleness exchange (codistillation).

A peer `publish`es one payload per round; `newest(peer, min_round)` returns the newest
payload of that peer from round ≥ min_round, waiting (up to a timeout) when there is none
yet. Unlike `all_gather`, nobody waits for everybody: a peer that is ahead waits only when
another peer's newest payload is too old.
"""

from __future__ import annotations

import threading
import time


class RoundBoard:
    def publish(self, round_id: int, peer: int, payload) -> int:
        """Publish; returns the number of bytes sent."""
        raise NotImplementedError

    def newest(self, peer: int, min_round: int, max_round: int, timeout: float) -> tuple[int, object] | None:
        """(round, payload) of `peer`'s newest publication with min_round ≤ round ≤ max_round,
        or None when none arrived within `timeout` seconds. (A peer that is ahead may already
        have published rounds after max_round: those cover batches this peer has not reached.)"""
        raise NotImplementedError


# Rounds a board keeps per peer: enough for the slowest reader allowed by any staleness bound
# we use; older rounds can never satisfy `min_round` again.
KEEP_ROUNDS = 8


def pick_round(published: dict[int, object], min_round: int, max_round: int) -> int | None:
    usable = [r for r in published if min_round <= r <= max_round]
    return max(usable) if usable else None


def payload_bytes(payload) -> int:
    import torch

    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, dict):
        return sum(payload_bytes(v) for v in payload.values())
    return 0


class LocalRoundBoard:
    """In-process board for peers running as threads."""

    def __init__(self, num_peers: int):
        self.num_peers = num_peers
        self.published: dict[int, dict[int, object]] = {}
        self.changed = threading.Condition()

    def for_peer(self, peer: int) -> "LocalRoundBoardClient":
        return LocalRoundBoardClient(self)


class LocalRoundBoardClient(RoundBoard):
    def __init__(self, board: LocalRoundBoard):
        self.board = board

    def publish(self, round_id: int, peer: int, payload) -> int:
        with self.board.changed:
            rounds = self.board.published.setdefault(peer, {})
            rounds[round_id] = payload
            for old in [r for r in rounds if r <= round_id - KEEP_ROUNDS]:
                del rounds[old]
            self.board.changed.notify_all()
        return payload_bytes(payload)

    def newest(self, peer: int, min_round: int, max_round: int, timeout: float):
        deadline = time.monotonic() + timeout
        with self.board.changed:
            while True:
                rounds = self.board.published.get(peer, {})
                found = pick_round(rounds, min_round, max_round)
                if found is not None:
                    return found, rounds[found]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.board.changed.wait(remaining)
