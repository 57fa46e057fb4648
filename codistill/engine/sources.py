"""Signal sources: how the engine serves what a method declared it needs, through one small
protocol. Each step the loop asks every source of the job to fill its part of the step's
`Signals`; which sources a job has follows from `method.needs` alone (`make_job`), so the
engine never asks which method it runs."""

from __future__ import annotations

import torch
from torch import nn

from codistill.methods import Signals
from codistill.models.taps import capture_taps, tap_shapes


class SignalSource:
    timing = "exchange_ms"
    """The record column that the time spent serving accumulates into."""

    def serve(self, job, step: int, x: torch.Tensor, signals: Signals) -> dict:
        """Fill `signals` for this step; return record fields (e.g. a round's figures)."""
        raise NotImplementedError


class PeerPayloads(SignalSource):
    """Every step: send the method's payload, receive every other peer's (an all-gather)."""

    def serve(self, job, step, x, signals):
        gathered = job.exchange.all_gather(job.method.payload(signals.outputs, signals.taps))
        signals.peers = [p for k, p in enumerate(gathered) if k != job.peer.index]
        return {}


class FrozenTeacher(SignalSource):
    """A frozen network's logits and taps on this step's batch: eval mode, no gradient, in no
    optimizer and no checkpoint (it is not part of the peer)."""

    timing = "teacher_ms"

    def __init__(self, network: nn.Module, tap_paths: dict[str, str], norm_paths: dict[str, str] | None = None,
                 stages: list | None = None):
        self.network = network.eval().requires_grad_(False)
        self.tap_paths = tap_paths
        # (stage, its trained network): frozen like the teacher, served beside its outputs.
        self.stages = [(stage, module.eval().requires_grad_(False)) for stage, module in stages or []]
        # A frozen network's batch-norm parameters are constants: looked up once.
        self.norms = {}
        for tap, path in (norm_paths or {}).items():
            norm = network.get_submodule(path)
            self.norms.update({f"norm.{tap}.weight": norm.weight.detach(), f"norm.{tap}.bias": norm.bias.detach()})

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with capture_taps(self.network, self.tap_paths) as taps:
            logits = self.network(x)
        out = {"logits": logits, **taps, **self.norms}
        for stage, module in self.stages:
            out.update(stage.serve(module, out))
        return out

    def tap_shapes(self, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
        return tap_shapes(self.network, self.tap_paths, example.to(next(self.network.parameters()).device))

    def serve(self, job, step, x, signals):
        signals.teacher = self.outputs(x)
        return {}
