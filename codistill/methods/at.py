"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), from a teacher or between peers.

    Q(A) = vec(mean_c |A_c|²) / ‖vec(mean_c |A_c|²)‖₂              (activation-based attention)
    L = CE + (β/2) · Σ_j mean((Q(A_s^j) − Q(A_t^j))²)               (β = `weight`: the paper's β/2; its code
    and RepDistiller's apply β · Σ without the ½, so their β = 1000 is `weight: 2000` here — tests/test_parity.py)

over the feature taps j (e.g. each stage's output). With `source: peers` the target maps are
the other peers' (online, every step, through the exchange: each peer sends its maps as
`attention.<tap>` beside its logits), averaged over the peers — attention transfer between
peers of different architectures, since maps of different lengths or sizes are resized to
the receiving peer's (and normalised again) before they are compared.
"""

from dataclasses import dataclass
from typing import ClassVar

from codistill.methods.base import register_method
from codistill.methods.losses import attention_distance, attention_map
from codistill.methods.sourced import SourcedMethod, TapTargetsConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class ATConfig(TapTargetsConfig):
    term: ClassVar[str] = "attention transfer"
    weight: float = 1000.0
    """β of the paper (the loss is β/2 · Σ over taps)."""


@register_method("at")
class AttentionTransfer(SourcedMethod):
    config_class = ATConfig

    def peer_payload(self, logits, outputs, taps):
        # The maps, not the features: what a peer of another width can compare with its own.
        return {f"attention.{tap}": attention_map(taps[tap]) for tap in self.config.taps}

    def distill_terms(self, s):
        c = self.config
        own = {tap: attention_map(s.taps[tap]) for tap in c.taps}
        at = self.mean_over_targets(s, lambda target: sum(attention_distance(own[tap], target[f"attention.{tap}"])
                                                          for tap in c.taps))
        return c.weight / 2 * at, {"at": at.detach()}
