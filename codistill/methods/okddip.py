"""OKDDip: online knowledge distillation with diverse peers (Chen et al., AAAI 2020).

Two-level distillation. Peers 0 … K−2 are auxiliary peers; the last peer is the group leader,
the model deployed. Each peer maps its penultimate features h to a query q = W_q h and a key
k = W_k h (its own projections, so peers of different widths meet in one d-dimensional space).

First level, auxiliary peer i: its own target is an attention-weighted mix of the auxiliary
peers' logits, itself included,
    t_i = Σ_j α_ij z_j,   α_ij = softmax_j(q_i · k_j),
    loss_i = CE(z_i, y) + w · T²·KL(softmax(t_i/T) ‖ softmax(z_i/T)).
t_i is not detached (as in the reference code): the KL trains the projections through α.
Second level, the leader L: loss_L = CE(z_L, y) + w · T²·KL(softmax(z̄/T) ‖ softmax(z_L/T)),
z̄ = the mean of the auxiliary peers' logits.

Across workers, other peers' logits and keys arrive detached (gradients do not cross
workers): peer i's KL trains its own query, key and logits; in the reference's one network
it also reaches the other branches. In one network (`branches: m`) the same per-branch
loss is used, so both forms train the same way.
"""

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from codistill.errors import check
from codistill.methods.losses import attention_weights, soft_kl, soft_kl_to_logits, soft_targets
from codistill.methods.base import register_method, weighted_kl
from codistill.methods.peers import PeerMethod, PeerMethodConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class OKDDipConfig(PeerMethodConfig):
    min_peers: ClassVar[int] = 2
    temperature: float = 3.0
    """The reference code's CIFAR setting."""
    attention_dim: int = 8
    """d: the width of queries and keys (the reference: the feature width / 8)."""

    def __post_init__(self):
        PeerMethodConfig.__post_init__(self)
        check(self.attention_dim >= 1, "attention_dim", f"must be >= 1, got {self.attention_dim}")


class AttentionOutputs(NamedTuple):
    logits: torch.Tensor
    query: torch.Tensor  # (B, d): projections of the penultimate features
    key: torch.Tensor    # (B, d)


class AttentionPeer(nn.Module):
    """A peer model with query and key projections of its penultimate features."""

    def __init__(self, model: nn.Module, dim: int):
        super().__init__()
        self.model = model
        self.query = nn.Linear(model.feature_dim, dim, bias=False)
        self.key = nn.Linear(model.feature_dim, dim, bias=False)

    def forward(self, x):
        features = self.model.features(x)
        return AttentionOutputs(self.model.classifier(features), self.query(features), self.key(features))


@register_method("okddip")
class OKDDip(PeerMethod):
    config_class = OKDDipConfig

    def peer_network(self, model):
        return AttentionPeer(model, self.config.attention_dim)

    def peer_logits(self, outputs):
        return outputs.logits

    def own_payload(self, logits, outputs, taps):
        return {"logits": logits, "key": outputs.key}

    def distill_terms(self, s):
        T = self.config.temperature
        leader = s.peer == len(s.peers)  # the last of the K peers (or branches)
        auxiliaries = s.peers if leader else s.peers[:-1]  # the leader's payload comes last
        if leader:
            target = torch.stack([p["logits"] for p in auxiliaries]).mean(0)
            kl = soft_kl(s.logits, soft_targets(target, T), T)
        else:
            keys = torch.stack([s.outputs.key] + [p["key"] for p in auxiliaries])       # (M, B, d)
            logits = torch.stack([s.logits] + [p["logits"] for p in auxiliaries])      # (M, B, C)
            target = torch.einsum("bm,mbc->bc", attention_weights(s.outputs.query, keys), logits)
            kl = soft_kl_to_logits(s.logits, target, T)  # a live target: gradients through it stay finite
        weight = self.config.weight_at(s.step)
        return weighted_kl(kl, weight)
