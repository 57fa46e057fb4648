"""In-process exchange for K peers running as threads (the local runner and tests)."""

from __future__ import annotations

import threading

import torch

from codistill.exchange.base import Exchange


class LocalBoard:
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
    def __init__(self, board: LocalBoard, peer: int):
        self.board = board
        self.peer = peer
        self.num_peers = board.num_peers
        self.calls = 0

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        slots = self.board.slots[self.calls % 2]
        self.calls += 1
        slots[self.peer] = tensor.detach()
        self.board.barrier.wait()
        return list(slots)
