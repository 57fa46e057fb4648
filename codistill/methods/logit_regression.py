"""Logit regression (Ba & Caruana, "Do deep nets really need to be deep?", NeurIPS 2014), from a
teacher or between peers.

    L_lr = ½ · (1/B) Σ_b ‖z_s(x_b) − z_t(x_b)‖²₂           (summed over classes, averaged over the batch)
    L    = (1 − α)·CE(z_s, y) + α·L_lr                     (α = `alpha`)

The paper's student ("mimic model") regresses the teacher's logits — the values before the
softmax — with this L2 loss and sees no labels (α = 1, the default). Regressing logits rather
than probabilities keeps the information a softmax squashes (the relative scale of the classes
the teacher thinks unlikely); it is KD's high-temperature limit (Hinton et al. 2015, §2.1).

With `source: peers` the targets are the other peers' logits every step (already in every
peer's payload), averaged over the peers: ½·mean_j ‖z_i − z_j‖². Peers need α < 1 — peers that
only regress each other's logits have nothing tying them to the labels.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from codistill.errors import check
from codistill.methods.base import register_method
from codistill.methods.losses import logit_l2
from codistill.methods.sourced import SourcedConfig, SourcedMethod


@dataclass(frozen=True, kw_only=True, slots=True)
class LogitRegressionConfig(SourcedConfig):
    term: ClassVar[str] = "logit regression"
    alpha: float = 1.0
    """Weight α of the regression term; the cross-entropy gets 1 − α (1: the paper, no labels)."""

    def __post_init__(self):
        check(0 <= self.alpha <= 1, "alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.uses_teacher or self.alpha < 1, "alpha",
              "between peers must be < 1: peers that only regress each other's logits never see a label")


@register_method("logit_regression")
class LogitRegression(SourcedMethod):
    config_class = LogitRegressionConfig

    def distill_terms(self, s):
        values = [logit_l2(s.logits, target["logits"]) for target in self.targets(s)]
        # stack().mean() rather than the base's Σ / count: the mean this term has always been
        # recorded with (the two differ in the last bit from three targets on).
        value = torch.stack(values).mean() if values else torch.zeros((), device=s.logits.device)
        return self.config.alpha * value, {"logit_l2": value.detach()}

    def own_loss(self, s):
        ce = s.cross_entropy(s.logits)
        term, terms = self.distill_terms(s)
        return (1 - self.config.alpha) * ce + term, {"ce": ce.detach(), **terms}
