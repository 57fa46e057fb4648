"""Codistillation (Anil et al. 2018, "Large scale distributed neural network training through
online distillation").

Peer i minimises CE(z_i, y) + w(step) · T²·KL(p̄ ‖ softmax(z_i/T)), p̄ = mean_{j≠i} softmax(z̃_j/T):
the KL to the mean of the other peers' distributions, where z̃_j are peer j's predictions from its
weights at the start of a round at most `max_staleness` rounds back (each round `period` steps),
and w = 0 for the first `burn_in` steps. With top-k targets (`exchange.top_k`) p̄ is the mean of
the peers' top-k distributions, each peer's tail mass spread evenly over the tokens it did not
send, and the KL is over the union of the sent tokens plus one bucket for the rest
(`losses.mean_top_k_kl`): with k = V exactly the whole-logit objective, with one other peer the
top-k KL of that peer. (DML takes the mean of the KLs to each peer, another objective for K ≥ 3.)
Peers exchange once a round, through the runner's round exchange (a round board on Ray, in memory
on the local runner), and need not run in lock-step: the method declares its rounds
(`Needs.rounds`) and the engine serves the stale predictions (`engine/stale_peers.py`).
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from codistill.errors import check
from codistill.methods.losses import mean_target_kl
from codistill.methods.base import DistillConfig, Method, Needs, RoundSpec, register_method, weighted_kl


@dataclass(frozen=True, kw_only=True, slots=True)
class CodistillConfig(DistillConfig):
    min_peers: ClassVar[int] = 2
    takes_top_k: ClassVar[bool] = True
    composable: ClassVar[bool] = False  # it shapes the exchange (rounds)
    burn_in: int = 0
    """Steps trained with cross-entropy only, before any exchange (the paper's burn-in)."""
    period: int = 50
    """Steps per round: peers exchange once per round."""
    max_staleness: int = 1
    """Rounds a peer may run ahead of another before it waits for that peer's newer exchange."""
    publish: Literal["predictions", "weights"] = "predictions"
    """predictions: each peer sends its predictions on the coming rounds' batches (K·batches·C
    floats). weights: each peer sends its state dict; the others run a stale copy (K·|θ|)."""
    wait_timeout_s: float = 300.0
    """How long a peer waits for a late peer before distilling from the peers that are present."""

    def __post_init__(self):
        DistillConfig.__post_init__(self)
        check(self.burn_in >= 0, "burn_in", f"must be >= 0, got {self.burn_in}")
        check(self.period >= 1, "period", f"must be >= 1, got {self.period}")
        check(self.max_staleness >= 0, "max_staleness", f"must be >= 0, got {self.max_staleness}")
        check(self.wait_timeout_s > 0, "wait_timeout_s", f"must be > 0, got {self.wait_timeout_s}")

    def own_needs(self) -> Needs:
        return Needs(rounds=RoundSpec(self.period, self.max_staleness, self.publish, self.burn_in, self.wait_timeout_s))


@register_method("codistill")
class Codistill(Method):
    config_class = CodistillConfig

    def distill_weight(self, step: int) -> float:
        if step < self.config.burn_in:
            return 0.0
        return self.config.weight_at(step - self.config.burn_in)

    def distill_terms(self, s):
        weight = self.distill_weight(s.step)
        if weight == 0.0 or not s.peers:
            kl = torch.zeros((), device=s.logits.device)
        else:
            # Toward the mean of the peers' distributions, from whole logits or top-k targets
            # alike (the mean of the KLs to each, DML's objective, is another one for K >= 3).
            kl = mean_target_kl(s.logits, s.peers, self.config.temperature)
        return weighted_kl(kl, weight)
