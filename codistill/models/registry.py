"""One registry for every model, timm-style: a name → a builder and the input it takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class PeerModel(nn.Module):
    """A classifier split into `features` (the penultimate vector) and a linear `classifier`,
    so methods that add heads on the features (ONE's gate) work on any registered model."""

    def __init__(self, features: nn.Sequential, feature_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[[int], nn.Module]
    input_kind: str
    """'sequence' (MNIST-1D shaped) or 'image' (3-channel images)."""
    branch_point: int | None = None
    """Index into `features` where high-level layers begin: ONE shares `features[:branch_point]`
    as its trunk and copies the rest into each branch. None: the model cannot branch."""


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, input_kind: str, branch_point: int | None = None):
    def decorator(fn: Callable[[int], nn.Module]):
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = ModelEntry(fn, input_kind, branch_point)
        return fn
    return decorator


def create_model(name: str, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    return MODELS[name].build(num_classes)
