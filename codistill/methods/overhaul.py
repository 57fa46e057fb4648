"""A comprehensive overhaul of feature distillation (Heo et al., ICCV 2019), from a teacher or
between peers.

    m_c   = E[x | x < 0],  x ~ N(β_c, γ_c²)        (the teacher's margin per channel, from the BN
                                                   before its ReLU; eq. 3)
    t̂     = max(t, m)                              (t: the teacher's pre-ReLU feature map)
    d_p(s, t̂) = Σ (r(s) − t̂)² · 1[r(s) > t̂ or t̂ > 0]    (partial L2, eq. 4; r: the connector)
    L     = CE + λ · (1/B) Σ_i 2^−(n−1−i) · d_p(r_i(s_i), t̂_i)    (λ = `weight`)

over the n tap pairs listed from shallow to deep (the paper's stage weights: the deepest 1, the
one before ½, then ¼, …). Both sides are taken BEFORE the ReLU (`.pre` taps), so the student
learns the teacher's negative responses only down to where the ReLU would erase them. The
connector r is a 1×1 convolution (no bias) + batch norm on the student, trained with it, mapping
its channels to the teacher's (then pooled to the teacher's size if the maps differ).

λ = 1e-3 is the authors' CIFAR setting (their loss is the sum / B / 1000; ImageNet: 1e-4).

Where the margin comes from: the batch norm the model registry names before the teacher's tap
(`ModelEntry.norms`: β and |γ| of its affine output, as the authors' `get_margin_from_BN`).
A tap with no batch norm before it (the MNIST-1D CNNs have none) takes the margin from the
teacher's pre-activation on this batch (per-channel mean and population std — what a batch norm
in training mode would see), which is a deviation the paper has no counterpart for.

With `source: peers` each peer sends its pre-ReLU maps and their batch margins; a peer's
connector maps its channels to its own width, so the peers' tapped maps must have equal
channels (the targets are averaged over the other peers).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from codistill.errors import ConfigError
from codistill.methods.base import register_method
from codistill.methods.losses import batch_margin, negative_gaussian_mean, partial_l2
from codistill.methods.sourced import SourcedMethod, TapTargetsConfig

CONNECTORS = "overhaul_connectors"


@dataclass(frozen=True, kw_only=True, slots=True)
class OverhaulConfig(TapTargetsConfig):
    """`taps`: the student's pre-ReLU taps, shallow to deep (e.g. `[conv1.pre, conv2.pre, conv3.pre]`)."""

    term: ClassVar[str] = "the overhaul"
    reads_teacher_norms: ClassVar[bool] = True  # the margins come from the BN before each tap
    weight: float = 1e-3
    """λ: weight of the distillation term (1e-3 the authors' CIFAR setting)."""


class Connector(nn.Module):
    """The authors' connector: a 1×1 convolution without bias, then batch norm (a linear map for
    vector taps); convolution weights N(0, 2/(k²·C_out)), BN γ = 1, β = 0, as theirs."""

    def __init__(self, own: tuple[int, ...], target: tuple[int, ...]):
        super().__init__()
        self.size = tuple(target[1:])
        spatial = len(own) - 1
        layer = {0: nn.Linear, 1: nn.Conv1d, 2: nn.Conv2d}[spatial]
        self.map = layer(own[0], target[0], bias=False) if spatial == 0 else layer(own[0], target[0], 1, bias=False)
        self.norm = (nn.BatchNorm2d if spatial == 2 else nn.BatchNorm1d)(target[0])
        nn.init.normal_(self.map.weight, 0.0, (2.0 / target[0]) ** 0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.map(h))
        if out.shape[2:] != self.size:
            pool = F.adaptive_avg_pool1d if out.dim() == 3 else F.adaptive_avg_pool2d
            out = pool(out, self.size)
        return out


def _key(tap: str) -> str:
    return tap.replace(".", "_")  # a module name holds no dots


@register_method("overhaul")
class Overhaul(SourcedMethod):
    config_class = OverhaulConfig

    def own_network(self, model, model_name, tap_shapes):
        # One connector per tap for every target: to the teacher's channels, or to its own between peers.
        targets = self.matched_shapes(tap_shapes)
        connectors = nn.ModuleDict({_key(tap): Connector(tap_shapes["own"][tap], targets[tap]) for tap in self.config.taps})
        model.add_module(CONNECTORS, connectors)  # trained with the student, in its checkpoints
        return model

    def peer_payload(self, logits, outputs, taps):
        sent = {}
        for tap in self.config.taps:
            sent[f"preact.{tap}"] = taps[tap]
            sent[f"margin.{tap}"] = batch_margin(taps[tap])  # a peer has no frozen BN to read it from
        return sent

    def teacher_target(self, teacher):
        """The teacher's maps as a peer sends its own, but each margin from the BN before the
        teacher's ReLU where its model declares one (the paper's), else from this batch."""
        target = {}
        for tap, t_tap in self.config.tap_pairs:
            target[f"preact.{tap}"] = teacher[t_tap]
            target[f"margin.{tap}"] = self._teacher_margin(teacher, t_tap)
        return target

    def _distance(self, s, targets: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """(1/B) Σ_i 2^−(n−1−i) · d_p over the taps, against [(target map, its margin)] in tap order."""
        connectors = s.network.get_submodule(CONNECTORS)
        n = len(self.config.taps)
        total = 0.0
        for i, (tap, (target, margin)) in enumerate(zip(self.config.taps, targets)):
            mapped = connectors[_key(tap)](s.taps[tap])
            if mapped.shape[1] != target.shape[1]:
                raise ConfigError("method.taps", f"the overhaul between peers needs maps of equal channels: tap "
                                  f"{tap!r} has {mapped.shape[1]} channels here and {target.shape[1]} at a peer")
            total = total + partial_l2(mapped, target, margin) / 2 ** (n - 1 - i)
        return total / s.taps[self.config.taps[0]].shape[0]

    def distill_terms(self, s):
        c = self.config
        value = self.mean_over_targets(s, lambda target: self._distance(
            s, [(target[f"preact.{tap}"], target[f"margin.{tap}"]) for tap in c.taps]))
        return c.weight * value, {"overhaul": value.detach()}

    @staticmethod
    def _teacher_margin(teacher: dict, tap: str) -> torch.Tensor:
        if f"norm.{tap}.weight" in teacher:  # the paper: from the BN before the ReLU
            return negative_gaussian_mean(teacher[f"norm.{tap}.bias"], teacher[f"norm.{tap}.weight"].abs())
        return batch_margin(teacher[tap])
