"""Feature taps: the outputs of named submodules, caught during the one forward pass that also
gives the logits (forward hooks, so models stay plain `nn.Module`s)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def capture_taps(model: nn.Module, paths: dict[str, str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward of `model` fills the yielded dict with tap name → output
    of the submodule at its path. Hooks are removed on leaving: a model is never left hooked."""
    caught: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, path in paths.items():
            def hook(module, inputs, output, name=name):
                caught[name] = output
            handles.append(model.get_submodule(path).register_forward_hook(hook))
        yield caught
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def tap_shapes(model: nn.Module, paths: dict[str, str], example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The shape (batch excluded) of each tap on an example batch, in eval mode (the model's
    mode is restored after)."""
    if not paths:
        return {}
    was_training = model.training
    model.eval()
    with capture_taps(model, paths) as taps:
        model(example)
    model.train(was_training)
    return {name: tuple(t.shape[1:]) for name, t in taps.items()}
