"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), from a teacher or between peers.

    Q(A) = vec(mean_c |A_c|²) / ‖vec(mean_c |A_c|²)‖₂              (activation-based attention)
    L = CE + (β/2) · Σ_j mean((Q(A_s^j) − Q(A_t^j))²)               (β = `weight`, 1000 in the paper's code)

over the feature taps j (e.g. each stage's output). With `source: peers` the target maps are
the other peers' (online, every step, through the exchange: each peer sends its maps as
`attention.<tap>` beside its logits), averaged over the peers — attention transfer between
peers of different architectures, since maps of different lengths or sizes are resized to
the receiving peer's (and normalised again) before they are compared.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from codistill.errors import check
from codistill.methods.losses import attention_distance, attention_map
from codistill.methods.base import Method, MethodConfig, Needs, register_method


@dataclass(frozen=True, kw_only=True, slots=True)
class ATConfig(MethodConfig):
    can_use_teacher: ClassVar[bool] = True
    reads_feature_taps: ClassVar[bool] = True
    taps: tuple[str, ...]
    """The feature taps whose attention maps are matched (e.g. `[conv2, conv3]`)."""
    teacher_taps: tuple[str, ...] = ()
    """The teacher's taps paired with `taps` in order (default: the same names)."""
    source: Literal["teacher", "peers"] = "teacher"
    """Whose maps are the targets: a frozen teacher's, or the other peers' every step."""
    weight: float = 1000.0
    """β of the paper (the loss is β/2 · Σ over taps)."""

    def __post_init__(self):
        check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        check(not self.teacher_taps or len(self.teacher_taps) == len(self.taps), "teacher_taps",
              f"pairs with `taps` in order: give {len(self.taps)} names, got {len(self.teacher_taps)}")

    @property
    def uses_teacher(self) -> bool:
        return self.source == "teacher"

    @property
    def target_taps(self) -> tuple[str, ...]:
        return self.teacher_taps or self.taps

    def check(self, peers, teacher) -> None:
        MethodConfig.check(self, peers, teacher)
        check(self.source == "teacher" or len(peers) >= 2, "peers",
              f"attention transfer between peers needs at least 2 peers, got {len(peers)}")
        self.check_taps(self.taps, "method.taps", [(f"peers.{i}", p.model) for i, p in enumerate(peers)])
        if self.uses_teacher:
            self.check_taps(self.target_taps, "method.teacher_taps", [("teacher", teacher.model)])


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
