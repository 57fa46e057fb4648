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

import torch

from codistill.methods.losses import attention_distance, attention_map
from codistill.methods.base import Method, Needs, TapTargetsConfig, register_method


@dataclass(frozen=True, kw_only=True, slots=True)
class ATConfig(TapTargetsConfig):
    term: ClassVar[str] = "attention transfer"
    weight: float = 1000.0
    """β of the paper (the loss is β/2 · Σ over taps)."""


@register_method("at")
class AttentionTransfer(Method):
    config_class = ATConfig

    def own_needs(self) -> Needs:
        c = self.config
        if c.source == "peers":
            return Needs(taps=frozenset(c.taps), peers=True)
        return Needs(taps=frozenset(c.taps), teacher=True, teacher_taps=frozenset(c.target_taps))

    def own_payload(self, logits, outputs, taps):
        if self.config.source != "peers":
            return {}
        return {f"attention.{tap}": attention_map(taps[tap]) for tap in self.config.taps}

    def distill_terms(self, s):
        c = self.config
        own = {tap: attention_map(s.taps[tap]) for tap in c.taps}
        if c.source == "teacher":
            at = sum(attention_distance(own[tap], attention_map(s.teacher[t_tap]))
                     for tap, t_tap in zip(c.taps, c.target_taps))
        elif s.peers:
            at = sum(sum(attention_distance(own[tap], p[f"attention.{tap}"]) for tap in c.taps)
                     for p in s.peers) / len(s.peers)
        else:
            at = torch.zeros((), device=s.logits.device)
        return c.weight / 2 * at, {"at": at.detach()}
