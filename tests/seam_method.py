"""A method defined outside codistill, as a user would write one: it uses a feature tap of its
own network *and* its peers' payloads every step, and touches neither engine/ nor exchange/.
Configs name this module in `imports:` so Ray workers register it too.

    L = CE + w · mean_j mean((pool(h_i) − pool(h_j))²)     (h: the tap, pooled over length)
"""

from dataclasses import dataclass

from codistill import Method, MethodConfig, Needs, register_method
from codistill.methods import METHODS


@dataclass(frozen=True, kw_only=True, slots=True)
class TapAgreementConfig(MethodConfig):
    tap: str = "conv2"
    weight: float = 1.0

    def own_needs(self):
        return Needs(taps=frozenset([self.tap]), peers=True)


class TapAgreement(Method):
    config_class = TapAgreementConfig

    def own_payload(self, logits, outputs, taps):
        return {"logits": logits, "pooled": taps[self.config.tap].mean(-1)}

    def distill_terms(self, s):
        own = s.taps[self.config.tap].mean(-1)
        agreement = sum((own - p["pooled"]).pow(2).mean() for p in s.peers) / len(s.peers)
        return self.config.weight * agreement, {"agreement": agreement.detach()}


if "test_tap_agreement" not in METHODS:  # pytest may import this module under two names
    register_method("test_tap_agreement")(TapAgreement)
