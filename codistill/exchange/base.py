from __future__ import annotations

import torch


class Exchange:
    """Every peer calls `all_gather(tensor)` in the same order; each call returns the K
    peers' tensors indexed by peer (the caller's own included). Tensors must have the
    same shape on every peer."""

    num_peers: int
    peer: int

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError
