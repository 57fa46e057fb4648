"""What every method shares: its config base classes, the interface and the registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from codistill.config import ConfigError, _check
from codistill.losses import linear_rampup


@dataclass(frozen=True, kw_only=True, slots=True)
class MethodConfig:
    name: str
    """Registered method name."""
    min_peers: ClassVar[int] = 1

    def check_peers(self, peers) -> None:
        """Raise ConfigError (key path from the top of the config) if the peers do not suit."""
        if len(peers) < self.min_peers:
            raise ConfigError("peers", f"method {self.name!r} needs at least {self.min_peers} peers, got {len(peers)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DistillConfig(MethodConfig):
    temperature: float = 1.0
    """Softmax temperature T of the soft targets (> 0)."""
    weight: float = 1.0
    """Weight of the distillation term against the cross-entropy."""
    rampup_steps: int = 0
    """Ramp the distillation weight linearly from 0 over this many steps (0: no ramp)."""

    def __post_init__(self):
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        _check(self.rampup_steps >= 0, "rampup_steps", f"must be >= 0, got {self.rampup_steps}")

    def weight_at(self, step: int) -> float:
        return self.weight * linear_rampup(step, self.rampup_steps)


class Method:
    """A training objective for one peer.

    `loss(logits, peer_logits, labels, step)` returns the scalar to minimise and a dict of
    named terms for the records (detached tensors or floats; the loop converts them in bulk, so
    a GPU is not synchronised every step). `peer_logits` are the other peers' predictions on the same
    batch, already detached: a peer learns from its peers but never pushes gradients into them.
    """

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    uses_peers: ClassVar[bool] = True
    """False when the loss needs no every-step exchange: the loop then skips it entirely."""
    periodic: ClassVar[bool] = False
    """True when peers exchange every `period` steps with bounded staleness (codistillation)."""

    def __init__(self, config: MethodConfig):
        self.config = config

    def wrap_model(self, model: torch.nn.Module, model_name: str) -> torch.nn.Module:
        """The network this method trains, built around a registered model (default: itself)."""
        return model

    def payload(self, outputs) -> torch.Tensor:
        """What a peer sends its peers each step (default: its logits, detached)."""
        return outputs.detach()

    def loss(self, logits: torch.Tensor, peer_logits: list[torch.Tensor], labels: torch.Tensor,
             step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    def decorator(cls: type[Method]):
        METHODS[name] = cls
        return cls
    return decorator


def create_method(config: MethodConfig) -> Method:
    return METHODS[config.name](config)
