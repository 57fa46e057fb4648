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
import torch.nn.functional as F

from codistill.errors import ConfigError
from codistill.losses import gated_ensemble, soft_kl, soft_targets
from codistill.methods.base import DistillConfig, Method, Needs, register_method
from codistill.models import MODELS
from codistill.models.multi_branch import GatedPeer, make_multi_branch


@dataclass(frozen=True, kw_only=True, slots=True)
class ONEConfig(DistillConfig):
    composable: ClassVar[bool] = False  # it shapes the network (branches, gates)
    temperature: float = 3.0
    """The ONE paper's code uses T = 3."""
    branches: int = 3
    """m ≥ 2: ONE inside one network with m branches (one peer). 1: ONE across the K peers."""

    def check(self, peers, teacher) -> None:
        if self.branches < 1:
            raise ConfigError("method.branches", f"must be >= 1, got {self.branches}")
        if self.branches >= 2:
            if len(peers) != 1:
                raise ConfigError("peers", f"ONE in one network (method.branches={self.branches}) trains exactly one "
                                  f"peer, got {len(peers)}; for ONE across peers set method.branches: 1")
            if MODELS[peers[0].model].branch_point is None:
                able = sorted(n for n, e in MODELS.items() if e.branch_point is not None)
                raise ConfigError("peers.0.model", f"{peers[0].model!r} has no trunk/branch split; "
                                  f"models that can branch: {', '.join(able)}")
        elif len(peers) < 2:
            raise ConfigError("peers", f"ONE across peers (method.branches: 1) needs at least 2 peers, got {len(peers)}")
        DistillConfig.check(self, peers, teacher)


@register_method("one")
class ONE(Method):
    config_class = ONEConfig

    def __init__(self, config: ONEConfig):
        self.in_one_network = config.branches >= 2
        super().__init__(config)

    def own_needs(self) -> Needs:
        return Needs(peers=not self.in_one_network)

    def own_network(self, model, model_name, tap_shapes):
        if self.in_one_network:
            return make_multi_branch(model, model_name, self.config.branches)
        return GatedPeer(model)

    def logits(self, outputs):
        if self.in_one_network:
            return gated_ensemble(outputs.logits, outputs.gate_logits)
        return outputs[0]

    def evaluation_heads(self, outputs):
        if not self.in_one_network:
            return {"model": outputs[0]}
        heads = {"ensemble": gated_ensemble(outputs.logits, outputs.gate_logits)}
        heads.update({f"branch{k}": z for k, z in enumerate(outputs.logits)})
        return heads

    def evaluation_members(self, heads):
        return [name for name in heads if name.startswith("branch")] if self.in_one_network else [next(iter(heads))]

    def own_payload(self, logits, outputs, taps):
        return {"logits": logits, "gate": outputs[1]}

    @property
    def splits(self):
        return not self.in_one_network

    def own_loss(self, s):
        if not self.in_one_network:
            return super().own_loss(s)  # CE(z_i) + distill_terms, which an overlapped step splits
        T, weight, labels = self.config.temperature, self.config.weight_at(s.step), s.labels
        logits, gate_logits = s.outputs  # (m, B, C), (B, m)
        ce_members = torch.stack([F.cross_entropy(z, labels) for z in logits]).sum()
        ensemble = gated_ensemble(logits, gate_logits)
        target = soft_targets(ensemble.detach(), T)
        kl = torch.stack([soft_kl(z, target, T) for z in logits]).sum()
        ce_ensemble = F.cross_entropy(ensemble, labels)
        total = ce_members + ce_ensemble + weight * kl
        return total, {"ce": ce_members.detach(), "ce_ensemble": ce_ensemble.detach(),
                       "kl": kl.detach(), "kl_weight": weight}

    def distill_terms(self, s):
        """Across peers: the ensemble's CE and the KL to it (the peer's own CE is added by `own_loss`)."""
        T, weight = self.config.temperature, self.config.weight_at(s.step)
        own_logits, own_gate = s.outputs  # (B, C), (B, 1)
        # The order of members does not change a gated sum, so own first, then the others.
        logits = torch.stack([own_logits] + [p["logits"] for p in s.peers])
        gate_logits = torch.cat([own_gate] + [p["gate"] for p in s.peers], dim=1)
        ensemble = gated_ensemble(logits, gate_logits)
        kl = soft_kl(own_logits, soft_targets(ensemble.detach(), T), T)
        ce_ensemble = F.cross_entropy(ensemble, s.labels)
        return ce_ensemble + weight * kl, {"ce_ensemble": ce_ensemble.detach(), "kl": kl.detach(), "kl_weight": weight}
