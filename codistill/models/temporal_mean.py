"""A network with its temporal mean (Tarvainen & Valpola 2017's mean teacher; PCL's peer mean
teacher): an exponential moving average of the network's weights, kept beside it.

The mean copy lives inside the module as a frozen submodule, so it is in the peer's
state dict — checkpointed with the peer and restored on resume — but in no optimizer (its
parameters do not require gradients). Its forward pass never builds a graph.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
from torch import nn


class LiveAndMean(NamedTuple):
    live: Any  # the network's outputs
    mean: Any  # its temporal mean's outputs (no graph)


class TemporalMean(nn.Module):
    def __init__(self, network: nn.Module, decay: float):
        super().__init__()
        self.live = network
        self.mean = copy.deepcopy(network).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """θ̄ ← α θ̄ + (1 − α) θ with α = min(decay, (step+1)/(step+10)): the mean teacher's warm-up,
        so early means are not dominated by the random initialisation."""
        alpha = min(self.decay, (step + 1) / (step + 10))
        for mean, live in zip(self.mean.parameters(), self.live.parameters()):
            mean.lerp_(live.detach(), 1 - alpha)
        for mean, live in zip(self.mean.buffers(), self.live.buffers()):
            mean.copy_(live)  # batch-norm statistics: the live network's (as timm's ModelEmaV2 with no decay on buffers)

    def forward(self, x: torch.Tensor) -> LiveAndMean:
        live = self.live(x)
        with torch.no_grad():
            self.mean.eval()  # the mean teacher predicts with its (copied) running statistics
            mean = self.mean(x)
        return LiveAndMean(live, mean)
