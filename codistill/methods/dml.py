"""Deep mutual learning (Zhang et al., CVPR 2018).

Peer i minimises CE(z_i, y) + w · (1/(K-1)) Σ_{j≠i} T²·KL(softmax(z_j/T) ‖ softmax(z_i/T)),
where z_j are the other peers' logits on the same batch at the same step. All peers update
in the same step (the paper's alternating update order makes no measurable difference and
would serialise the peers). With `branches: m` the peers are branches of one network.
"""

from dataclasses import dataclass
from typing import ClassVar

from codistill.methods.losses import mean_payload_kl
from codistill.methods.base import register_method, weighted_kl
from codistill.methods.peers import PeerMethod, PeerMethodConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class DMLConfig(PeerMethodConfig):
    min_peers: ClassVar[int] = 2
    takes_top_k: ClassVar[bool] = True


@register_method("dml")
class DML(PeerMethod):
    config_class = DMLConfig

    def distill_terms(self, s):
        # Peer logits arrive detached: each peer's own CE, not its peers' KL, trains it. A peer's
        # payload holds its logits, or its top-k soft target (`exchange.top_k`): the mean of the
        # KLs to each peer either way, the paper's objective (codistillation's is the KL to their mean).
        kl = mean_payload_kl(s.logits, s.peers, self.config.temperature)
        weight = self.config.weight_at(s.step)
        return weighted_kl(kl, weight)
