"""KDCL: knowledge distillation via collaborative learning (Guo et al., CVPR 2020).

The K peers' logits z_1 … z_K on the batch are combined into one ensemble teacher z_t, the
same for every peer, and peer i minimises

    CE(z_i, y) + w · T²·KL(softmax(z_t/T) ‖ softmax(z_i/T)),       z_t detached,

with z_t built one of four ways (`variant`):
    mean       z_t = (1/K) Σ_k z_k
    min_loss   z_t(n) = z_{k*}(n), k* = argmin_k CE(z_k(n), y(n))       (the paper's KDCL-Naive)
    min_logit  z_t(n,c) = min_k [z_k(n,c) − z_k(n,y(n))]                 (KDCL-MinLogit)
    linear     z_t = Σ_k α_k z_k, α on the simplex minimising CE(z_t, y) on the batch (KDCL-Linear)

Left out: the paper feeds each peer a differently augmented copy of the batch; here peers
share the batch, as every other method in the comparison does.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from codistill.methods.losses import min_logit, min_loss_logits, simplex_combination, soft_kl, soft_targets
from codistill.methods.base import register_method, weighted_kl
from codistill.methods.peers import PeerMethod, PeerMethodConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class KDCLConfig(PeerMethodConfig):
    min_peers: ClassVar[int] = 2
    variant: Literal["mean", "min_loss", "min_logit", "linear"] = "min_logit"
    """How the peers' logits make the teacher (the paper's best on CIFAR: min_logit)."""
    temperature: float = 2.0
    """The KDCL paper's CIFAR setting."""


def ensemble_teacher(logits: torch.Tensor, labels: torch.Tensor, variant: str) -> torch.Tensor:
    """logits: (K, B, C), detached → the teacher's logits (B, C)."""
    if variant == "mean":
        return logits.mean(0)
    if variant == "min_loss":
        return min_loss_logits(logits, labels)
    if variant == "min_logit":
        return min_logit(logits, labels)
    return torch.einsum("k,kbc->bc", simplex_combination(logits, labels), logits)


@register_method("kdcl")
class KDCL(PeerMethod):
    config_class = KDCLConfig

    def distill_terms(self, s):
        members = torch.stack([s.logits.detach()] + [p["logits"] for p in s.peers])
        T = self.config.temperature
        teacher = ensemble_teacher(members.float(), s.labels, self.config.variant)
        kl = soft_kl(s.logits, soft_targets(teacher, T), T)
        weight = self.config.weight_at(s.step)
        return weighted_kl(kl, weight)
