"""On-the-fly native ensemble (Lan et al., NeurIPS 2018), in one network or across peers.

In one network (`branches: m ≥ 2`, one peer): a shared trunk feeds m branches and a gate;
the gated ensemble z_e = Σ_k softmax(gate)_k · z_k is the teacher. The loss is
    Σ_k CE(z_k) + CE(z_e) + w · Σ_k T²·KL(softmax(z_e/T) ‖ softmax(z_k/T)),
with z_e detached in the KL term: the ensemble is trained only by its own CE, so the
branches cannot drag their teacher towards themselves.

Across peers (`branches: 1`, K ≥ 2 peers): each peer also emits a gate logit per sample,
and peers exchange [logits, gate] every step. Peer i builds the same ensemble from its own
live outputs and the others' detached ones, and minimises
    CE(z_i) + w · T²·KL(softmax(z_e/T) ‖ softmax(z_i/T)) + CE(z_e).
Summed over peers this is exactly the gradient of the one-network loss, partitioned: the
ensemble's CE reaches peer i only through z_i and its gate, which it holds live.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from codistill.methods.losses import gated_ensemble, soft_kl, soft_targets
from codistill.methods.base import register_method, weighted_kl
from codistill.methods.peers import PeerMethod, PeerMethodConfig
from codistill.models.multi_branch import GatedPeer, make_multi_branch


@dataclass(frozen=True, kw_only=True, slots=True)
class ONEConfig(PeerMethodConfig):
    min_peers: ClassVar[int] = 2
    composable: ClassVar[bool] = False  # it shapes the network (branches, gates)
    temperature: float = 3.0
    """The ONE paper's code uses T = 3."""
    branches: int = 3
    """m ≥ 2: ONE inside one network with m branches (one peer). 1: ONE across the K peers."""


@register_method("one")
class ONE(PeerMethod):
    """The gate is ONE's own part, and the hooks it overrides: in one network the paper's gate
    on the pooled trunk features (`branch_network`, `branch_ensemble`), across peers a gate
    head on each peer (`peer_network`)."""

    config_class = ONEConfig

    def peer_network(self, model):
        return GatedPeer(model)

    def branch_network(self, model, model_name):
        return make_multi_branch(model, model_name, self.config.branches)

    def branch_ensemble(self, outputs, firsts):
        return gated_ensemble(outputs.logits, outputs.gate_logits)

    def members(self, outputs):
        return list(outputs.logits) if self.trains_one_network else [outputs]

    def peer_logits(self, outputs):
        return outputs if self.trains_one_network else outputs.logits

    def logits(self, outputs):
        return gated_ensemble(outputs.logits, outputs.gate_logits) if self.trains_one_network else outputs.logits

    def own_payload(self, logits, outputs, taps):
        return {"logits": logits, "gate": outputs.gate}

    def loss(self, s):
        if not self.trains_one_network:
            return super().loss(s)  # CE(z_i) + distill_terms
        T, weight = self.config.temperature, self.config.weight_at(s.step)
        logits, gate_logits = s.outputs  # (m, B, C), (B, m)
        ce_members = torch.stack([s.cross_entropy(z) for z in logits]).sum()
        ensemble = gated_ensemble(logits, gate_logits)
        target = soft_targets(ensemble.detach(), T)
        kl = torch.stack([soft_kl(z, target, T) for z in logits]).sum()
        ce_ensemble = s.cross_entropy(ensemble)
        total = ce_members + ce_ensemble + weight * kl
        return total, {"loss": total.detach(), "ce": ce_members.detach(), "ce_ensemble": ce_ensemble.detach(),
                       "kl": kl.detach(), "kl_weight": weight}

    def distill_terms(self, s):
        """Across peers: the ensemble's CE and the KL to it (the peer's own CE is added by `own_loss`)."""
        T, weight = self.config.temperature, self.config.weight_at(s.step)
        own_logits, own_gate = s.outputs.logits, s.outputs.gate  # (B, C), (B, 1)
        # The order of members does not change a gated sum, so own first, then the others.
        logits = torch.stack([own_logits] + [p["logits"] for p in s.peers])
        gate_logits = torch.cat([own_gate] + [p["gate"] for p in s.peers], dim=1)
        ensemble = gated_ensemble(logits, gate_logits)
        kl = soft_kl(own_logits, soft_targets(ensemble.detach(), T), T)
        ce_ensemble = s.cross_entropy(ensemble)
        return weighted_kl(kl, weight, ce_ensemble=ce_ensemble)
