"""Independent training: cross-entropy only. The baseline every benchmark compares against."""

from dataclasses import dataclass

import torch.nn.functional as F

from codistill.methods.base import Method, MethodConfig, register_method


@dataclass(frozen=True, kw_only=True, slots=True)
class IndependentConfig(MethodConfig):
    pass


@register_method("independent")
class Independent(Method):
    config_class = IndependentConfig
    uses_peers = False

    def loss(self, logits, peer_logits, labels, step):
        ce = F.cross_entropy(logits, labels)
        return ce, {"loss": ce.detach(), "ce": ce.detach()}
