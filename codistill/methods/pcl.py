"""PCL: peer collaborative learning for online knowledge distillation (Wu & Gong, AAAI 2021).

Two teachers. The peer ensemble teacher z_e is a classifier on the peers' concatenated
features [h_1 … h_K]; a linear layer on a concatenation is a sum of one slice per peer,
z_e = Σ_j c_j with c_j = W_j h_j + b_j, so each peer owns and trains its slice and sends c_j.
The peer mean teacher of peer j is the temporal mean of its weights (an exponential moving
average, kept in its network: checkpointed, restored on resume), with logits z̄_j. Peer i
minimises

    CE(z_i, y) + CE(z_e, y)
      + w(t) · [ T²·KL(softmax(z_e/T) ‖ softmax(z_i/T)) + 1/(K−1) Σ_{j≠i} T²·KL(softmax(z̄_j/T) ‖ softmax(z_i/T)) ],

z_e detached in the KL; CE(z_e) reaches peer i only through its own slice c_i (the others
arrive detached), so summed over peers each slice gets exactly the gradient of the one
classifier. The model deployed is the temporal mean (each peer's first evaluation head).

Left out: the paper's per-branch random augmentation of the input, and its sigmoid-shaped
ramp-up of w (here `rampup_steps`, linear).
"""

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from codistill.errors import check
from codistill.methods.losses import mean_peer_kl, soft_kl, soft_targets
from codistill.methods.base import register_method
from codistill.methods.peers import PeerMethod, PeerMethodConfig
from codistill.models.temporal_mean import LiveAndMean, TemporalMean


@dataclass(frozen=True, kw_only=True, slots=True)
class PCLConfig(PeerMethodConfig):
    min_peers: ClassVar[int] = 2
    composable: ClassVar[bool] = False  # it shapes the network (ensemble slices, a temporal mean)
    temperature: float = 3.0
    """The PCL paper's setting."""
    mean_decay: float = 0.999
    """Decay of the temporal mean (the mean teacher's α)."""

    def __post_init__(self):
        PeerMethodConfig.__post_init__(self)
        check(0 <= self.mean_decay < 1, "mean_decay", f"must be in [0, 1), got {self.mean_decay}")


class SliceOutputs(NamedTuple):
    logits: torch.Tensor        # the peer's own classifier: z
    contribution: torch.Tensor  # its slice of the peer ensemble classifier: c = W h + b


class EnsembleSlicePeer(nn.Module):
    """A peer model plus its slice of the peer ensemble classifier."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.ensemble_slice = nn.Linear(model.feature_dim, model.classifier.out_features)

    def forward(self, x):
        features = self.model.features(x)
        return SliceOutputs(self.model.classifier(features), self.ensemble_slice(features))


@register_method("pcl")
class PCL(PeerMethod):
    config_class = PCLConfig

    def peer_network(self, model):
        return EnsembleSlicePeer(model)

    def whole_network(self, network):
        return TemporalMean(network, self.config.mean_decay)  # around the trunk too, in one network

    def members(self, outputs):
        live, mean = outputs
        lives, means = (list(live), list(mean)) if self.trains_one_network else ([live], [mean])
        return [LiveAndMean(l, m) for l, m in zip(lives, means)]  # each member: ((z, c), (z̄, c̄))

    def peer_logits(self, outputs):
        return outputs.live.logits

    def peer_heads(self, outputs):
        return {"temporal_mean": outputs.mean.logits, "live": outputs.live.logits}

    def own_payload(self, logits, outputs, taps):
        return {"logits": logits, "contribution": outputs.live.contribution, "mean_logits": outputs.mean.logits}

    def after_update(self, network, step):
        network.update(step)

    def distill_terms(self, s):
        T, weight = self.config.temperature, self.config.weight_at(s.step)
        ensemble = s.outputs.live.contribution + sum(p["contribution"] for p in s.peers)
        ce_ensemble = s.cross_entropy(ensemble)
        kl_ensemble = soft_kl(s.logits, soft_targets(ensemble.detach(), T), T)
        kl_mean = mean_peer_kl(s.logits, [p["mean_logits"] for p in s.peers], T)
        return ce_ensemble + weight * (kl_ensemble + kl_mean), {
            "ce_ensemble": ce_ensemble.detach(), "kl_ensemble": kl_ensemble.detach(), "kl_mean": kl_mean.detach(),
            "kl_weight": weight}
