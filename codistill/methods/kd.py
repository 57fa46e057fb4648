"""Knowledge distillation from a frozen teacher (Hinton et al. 2015), and the noisy teacher
(Sau & Balasubramanian 2016).

    L = (1 − α)·CE(z_s, y) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))

The T² keeps the soft term's gradient on the cross-entropy's scale as T changes. As an `also`
term (e.g. DML + KD) it adds α·T²·KL. Noisy teacher: each sample's teacher logits are
perturbed, with probability `noise_prob`, as z_t ← z_t·(1 + ξ), ξ ~ N(0, σ²) with σ =
`noise_std` — a regulariser that acts like learning from several teachers. The noise is drawn
from a generator of (seed, step, peer), so a run is the same in every runner and after a resume.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from codistill.errors import check
from codistill.methods.losses import payload_kl
from codistill.methods.base import Method, MethodConfig, Needs, register_method


@dataclass(frozen=True, kw_only=True, slots=True)
class KDConfig(MethodConfig):
    can_use_teacher: ClassVar[bool] = True
    takes_top_k: ClassVar[bool] = True  # a large-vocabulary teacher's targets cut to top-k (exchange.top_k)
    temperature: float = 4.0
    """Softmax temperature T of the teacher's soft targets (> 0); 4 is the common CIFAR choice."""
    alpha: float = 0.9
    """Weight α of the soft term; the cross-entropy gets 1 − α."""
    noise_std: float = 0.0
    """Noisy teacher: σ of the multiplicative Gaussian noise on the teacher's logits (0: off)."""
    noise_prob: float = 1.0
    """Noisy teacher: the probability that a sample's teacher logits are perturbed."""

    def __post_init__(self):
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0 <= self.alpha <= 1, "alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.noise_std >= 0, "noise_std", f"must be >= 0, got {self.noise_std}")
        check(0 <= self.noise_prob <= 1, "noise_prob", f"must be in [0, 1], got {self.noise_prob}")

    def own_needs(self) -> Needs:
        return Needs(teacher=True)


def perturb_logits(logits: torch.Tensor, std: float, prob: float, generator: torch.Generator) -> torch.Tensor:
    """z·(1 + ξ) for a random share `prob` of the samples, ξ ~ N(0, std²) per sample."""
    n = logits.shape[0]
    xi = std * torch.randn(n, 1, generator=generator)
    chosen = (torch.rand(n, 1, generator=generator) < prob).float()
    return logits * (1 + (xi * chosen).to(logits.device))


@register_method("kd")
class KD(Method):
    config_class = KDConfig

    def distill_terms(self, s):
        c = self.config
        teacher = s.teacher["logits"]
        if c.noise_std > 0:
            teacher = perturb_logits(teacher, c.noise_std, c.noise_prob, s.generator())
        # The teacher's soft target as a peer's would travel: whole, or top-k when exchange.top_k asks.
        kd = payload_kl(s.logits, self.sendable({"logits": teacher}), c.temperature)
        return c.alpha * kd, {"kd": kd.detach()}

    def own_loss(self, s):
        ce = s.cross_entropy(s.logits)
        soft, terms = self.distill_terms(s)
        return (1 - self.config.alpha) * ce + soft, {"ce": ce.detach(), **terms}
