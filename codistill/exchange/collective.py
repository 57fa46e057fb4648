"""torch.distributed all_gather over the peers' group: gloo on CPU, NCCL on GPU.

The fast path for every-step exchange. With several data-parallel workers per peer, worker m
of every peer forms one exchange group (they hold the same slice of the batch)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from codistill.exchange.base import Exchange


class CollectiveExchange(Exchange):
    def __init__(self, peer: int, num_peers: int, group=None, device: torch.device | None = None):
        self.peer = peer
        self.num_peers = num_peers
        self.group = group
        self.device = device or torch.device("cpu")

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        tensor = tensor.detach().to(self.device).contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.num_peers)]
        dist.all_gather(out, tensor, group=self.group)
        return out
