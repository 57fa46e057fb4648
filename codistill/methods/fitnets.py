"""FitNets: hints from a teacher's middle layer (Romero et al., ICLR 2015).

    L_hint = ½·mean((r(h_s) − h_t)²)

h_t is the teacher's hint layer, h_s the student's guided layer, r a regressor trained with
the student (a 1×1 convolution for feature maps, resized to the teacher's length or size, or
a linear map when one side is a vector). Two schedules:

- joint (default): L = CE + β·L_hint throughout (β = `weight`), as most reproductions run it;
- the paper's two stages: for the first `hint_steps` steps only L_hint trains (the student up to
  its guided layer, and r), then CE (+ β·L_hint if `weight` > 0; add `also: [{name: kd}]` for
  the paper's KD stage).
"""

from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F
from torch import nn

from codistill.errors import check
from codistill.methods.base import StagedTerm, TeacherTapConfig, register_method

REGRESSORS = "fitnets_regressor"


@dataclass(frozen=True, kw_only=True, slots=True)
class FitNetsConfig(TeacherTapConfig):
    student_tap: str
    """The student's guided layer (a feature tap of its model, e.g. `conv2`)."""
    teacher_tap: str
    """The teacher's hint layer (a feature tap of the teacher's model)."""
    weight: float = 1.0
    """β: weight of the hint loss against the cross-entropy (after the hint stage)."""
    hint_steps: int = 0
    """The paper's first stage: this many steps of hint loss alone (0: joint training)."""

    def __post_init__(self):
        check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        check(self.hint_steps >= 0, "hint_steps", f"must be >= 0, got {self.hint_steps}")


class Regressor(nn.Module):
    """Maps the student's guided layer (shape `own`, batch excluded) to the teacher's hint (`target`)."""

    def __init__(self, own: tuple[int, ...], target: tuple[int, ...]):
        super().__init__()
        self.target = tuple(target)
        self.convolutional = len(own) == len(target) >= 2
        if self.convolutional:
            conv = nn.Conv1d if len(own) == 2 else nn.Conv2d
            self.map = conv(own[0], target[0], kernel_size=1)
        else:
            self.map = nn.Linear(math.prod(own), math.prod(target))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.convolutional:
            return self.map(h.flatten(1)).view(-1, *self.target)
        out = self.map(h)
        if out.shape[2:] != self.target[1:]:
            pool = F.adaptive_avg_pool1d if out.dim() == 3 else F.adaptive_avg_pool2d
            out = pool(out, self.target[1:])
        return out


@register_method("fitnets")
class FitNets(StagedTerm):
    config_class = FitNetsConfig
    term = "hint"

    def own_network(self, model, model_name, tap_shapes):
        # The regressor is trained with the student, so it lives in the student's network (and
        # so in its optimizer and checkpoints); the forward pass is the model's own.
        model.add_module(REGRESSORS, Regressor(tap_shapes["own"][self.config.student_tap],
                                               tap_shapes["teacher"][self.config.teacher_tap]))
        return model

    def stage_steps(self) -> int:
        return self.config.hint_steps

    def term_loss(self, s) -> torch.Tensor:
        regressor = s.network.get_submodule(REGRESSORS)
        hint = s.teacher[self.config.teacher_tap].float()
        return 0.5 * (regressor(s.taps[self.config.student_tap]).float() - hint).pow(2).mean()
