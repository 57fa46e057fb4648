"""FSP: the flow of solution procedure (Yim et al., CVPR 2017).

    G(F1, F2) = (1/N) Σ_positions F1 · F2ᵀ               (a C1×C2 matrix per sample)
    L = CE + λ · Σ_pairs mean((G_s − G_t)²)               (λ = `weight`)

over pairs of feature taps (e.g. `[[conv1, conv2], [conv2, conv3]]`); the larger map of a pair
is pooled to the smaller's size. The student's and teacher's taps must have the same channels
(the paper pairs networks of equal widths, e.g. ResNet-56 → ResNet-20). The paper trains in two
stages: `fsp_steps` > 0 gives that many steps of FSP loss alone first, then CE (+ λ·FSP if
`weight` > 0).
"""

from dataclasses import dataclass
from typing import ClassVar


from codistill.errors import ConfigError, check
from codistill.methods.losses import fsp_matrix
from codistill.methods.base import MethodConfig, Needs, StagedTerm, register_method


@dataclass(frozen=True, kw_only=True, slots=True)
class FSPConfig(MethodConfig):
    can_use_teacher: ClassVar[bool] = True
    pairs: tuple[tuple[str, ...], ...]
    """Pairs of feature taps, each a [first, second] whose flow matrix is matched."""
    weight: float = 1.0
    """λ: weight of the FSP loss against the cross-entropy."""
    fsp_steps: int = 0
    """The paper's first stage: this many steps of FSP loss alone (0: joint training)."""

    def __post_init__(self):
        check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        check(self.fsp_steps >= 0, "fsp_steps", f"must be >= 0, got {self.fsp_steps}")
        for i, pair in enumerate(self.pairs):
            check(len(pair) == 2, f"pairs.{i}", f"a pair names two taps, got {list(pair)}")

    @property
    def taps(self) -> list[str]:
        return sorted({tap for pair in self.pairs for tap in pair})

    def own_needs(self) -> Needs:
        taps = frozenset(self.taps)
        return Needs(taps=taps, teacher=True, teacher_taps=taps)

    def check(self, peers, teacher) -> None:
        MethodConfig.check(self, peers, teacher)
        models = [(f"peers.{i}", p.model) for i, p in enumerate(peers)] + [("teacher", teacher.model)]
        self.check_taps(self.taps, "method.pairs", models)


@register_method("fsp")
class FSP(StagedTerm):
    config_class = FSPConfig
    term = "fsp"

    def own_network(self, model, model_name, tap_shapes):
        for tap in self.config.taps:
            own, teacher = tap_shapes["own"][tap], tap_shapes["teacher"][tap]
            if len(own) < 2 or own[0] != teacher[0]:
                raise ConfigError("method.pairs", (
                    f"FSP compares C1×C2 matrices, so the student's and teacher's tap {tap!r} need the same "
                    f"channels and a spatial extent; got student {list(own)} and teacher {list(teacher)} "
                    f"(model {model_name!r}). Use a teacher of the student's width, or FitNets/AT, which map across widths."))
        return model

    def stage_steps(self) -> int:
        return self.config.fsp_steps

    def term_loss(self, s):
        return sum((fsp_matrix(s.taps[a], s.taps[b]) - fsp_matrix(s.teacher[a], s.teacher[b])).pow(2).mean()
                   for a, b in self.config.pairs)
