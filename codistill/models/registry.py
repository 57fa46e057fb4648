"""One registry for every model, timm-style: a name → a builder, the input it takes, where it
may split into branches (any peer method with `method.branches >= 2`), and the named feature
taps methods may ask for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from codistill.errors import ConfigError
from codistill.registry import Registry


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
    """'sequence' (MNIST-1D shaped), 'image' (3-channel images) or 'tokens' (windows of token ids)."""
    branch_point: int | None = None
    """Index into `features` where high-level layers begin: a multi-branch network (`method.branches
    >= 2`, any peer method) shares `features[:branch_point]` as its trunk and copies the rest into
    each branch. None: the model cannot branch."""
    taps: dict[str, str] = field(default_factory=dict)
    """Tap name → the submodule (dotted path) whose output it is, e.g. {"stage2": "features.2"}:
    what feature-based methods (FitNets, attention transfer, FSP) may ask for."""
    norms: dict[str, str] = field(default_factory=dict)
    """Tap name → the batch norm (dotted path) whose affine output the tap's pre-activation is
    made of, e.g. {"stage3.pre": "features.3.8.body.4"}: its β and |γ| are the mean and spread of
    that pre-activation (the overhaul's margin). Taps with no batch norm before them are absent."""
    check: Callable[..., str | None] | None = None
    """What is wrong with a peer's model_args beyond their names (a folder that is not a model),
    said when the config is read, before anything is built. None: nothing to check."""
    check_tokenizer: Callable[[dict, str | None], str | None] | None = None
    """What is wrong with this model (built with these model_args) on ids from the tokenizer at
    this place (a folder or a file; None: nothing): a pretrained folder whose own tokenizer is
    not the run's."""
    loads_weights: Callable[[dict], bool] | None = None
    """Whether the model built with these model_args comes with trained weights of its own (a
    `from_pretrained` folder): such a model can teach without a checkpoint file."""
    export: Callable[[nn.Module, str], None] | None = None
    """How a trained network of this model is written as a folder another library loads
    (`hf_causal_lm`: the transformers model's `save_pretrained`), which `codistill export` calls.
    None: the model has no such folder (its weights stay in the run's checkpoints)."""
    blocks: Callable[[nn.Module], list[nn.Module]] | None = None
    """The transformer blocks of a built model, in order: what FSDP shards one by one and
    activation checkpointing recomputes (`train.sharding`, `train.activation_checkpointing`).
    None: the model has no such blocks (FSDP shards its top-level children)."""


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str, input_kind: str, branch_point: int | None = None, taps: dict[str, str] | None = None,
                   norms: dict[str, str] | None = None, check: Callable[..., str | None] | None = None,
                   check_tokenizer: Callable[[dict, str | None], str | None] | None = None,
                   loads_weights: Callable[[dict], bool] | None = None,
                   export: Callable[[nn.Module, str], None] | None = None,
                   blocks: Callable[[nn.Module], list[nn.Module]] | None = None):
    def decorator(fn: Callable[[int], nn.Module]):
        MODELS.add(name, ModelEntry(fn, input_kind, branch_point, dict(taps or {}), dict(norms or {}), check,
                                    check_tokenizer, loads_weights, export, blocks),
                   getattr(fn, "__module__", ""))
        return fn
    return decorator


def create_model(name: str, num_classes: int, **model_args) -> nn.Module:
    return MODELS.get(name, "model").build(num_classes, **model_args)


def check_model_args(name: str, model_args: dict) -> str | None:
    """What is wrong with `model_args` for model `name` (None: nothing): each must be a keyword
    argument of its builder."""
    import inspect

    params = list(inspect.signature(MODELS[name].build).parameters.values())[1:]  # after num_classes
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in model_args if k not in accepted]
    if unknown:
        return (f"model {name!r} has no setting {unknown[0]!r}; its settings: {', '.join(accepted) or 'none'}")
    return MODELS[name].check(**model_args) if MODELS[name].check else None


def loads_weights(name: str, model_args: dict) -> bool:
    """Whether model `name` built with `model_args` brings trained weights (see ModelEntry)."""
    entry = MODELS[name]
    return bool(entry.loads_weights and entry.loads_weights(model_args))


def check_model_tokenizer(name: str, model_args: dict, tokenizer: str | None, key: str) -> None:
    """A ConfigError naming `key` when model `name` cannot learn from ids of this tokenizer (see
    ModelEntry.check_tokenizer)."""
    entry = MODELS[name]
    problem = entry.check_tokenizer(model_args, tokenizer) if entry.check_tokenizer else None
    if problem:
        raise ConfigError(key, problem)
