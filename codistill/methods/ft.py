"""Factor transfer (Kim, Park & Kwak, "Paraphrasing Complex Network", NeurIPS 2018).

    stage 1 (teacher only):  min_P  |D(E(t)) − t|₁            P = (E, D): the paraphraser
    stage 2 (the student):   L = CE + β · mean |F_s/‖F_s‖₂ − F_t/‖F_t‖₂|,
                             F_t = E(t) (frozen),  F_s = T(s) (the translator, trained with the student)

t is the teacher's last feature map (`teacher_tap`), s the student's (`student_tap`). The
paraphraser is a convolutional autoencoder with paraphrase rate k: its encoder E maps t's C
channels through C → C → kC → kC (3×3 convolutions with bias, LeakyReLU(0.1), no batch norm),
its decoder mirrors E with transposed convolutions; the factor F_t = E(t) keeps t's size. It is
trained first, on the frozen teacher alone (the engine's teacher stage: once per run, stored,
never retrained), then frozen. The translator T has E's shape from the student's channels
(C_s → C_s → kC → kC), pooled to t's size when the maps differ. Each factor is flattened whole
and L2-normalised per sample (`factor_distance`, as the authors' `FT`); β = 500 as in their
script. The paraphraser's training follows theirs: L1 reconstruction, SGD (momentum 0.9, weight
decay 5e-4) at lr 0.1.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from codistill.errors import check
from codistill.methods.base import Method, MethodConfig, Needs, TeacherStage, register_method
from codistill.methods.losses import factor_distance

TRANSLATOR = "ft_translator"


@dataclass(frozen=True, kw_only=True, slots=True)
class FTConfig(MethodConfig):
    can_use_teacher: ClassVar[bool] = True
    student_tap: str
    """The student's last feature map (a tap of its model, e.g. `conv3`, `stage3`)."""
    teacher_tap: str
    """The teacher's last feature map, which the paraphraser encodes."""
    weight: float = 500.0
    """β: weight of the factor distance against the cross-entropy (500: the authors' script)."""
    rate: float = 0.5
    """k: the factor's channels are round(k · the teacher map's channels)."""
    paraphraser_steps: int = 1000
    """Batches the paraphraser trains on, before the student (the authors: 6 epochs of CIFAR-10)."""
    paraphraser_lr: float = 0.1
    """Its SGD learning rate (momentum 0.9, weight decay 5e-4, constant: the authors')."""
    paraphraser_loss: Literal["l1", "l2"] = "l1"
    """Its reconstruction loss (L1: the authors' `train_Paraphraser.py`)."""

    def __post_init__(self):
        check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        check(0 < self.rate <= 4, "rate", f"must be in (0, 4], got {self.rate}")
        check(self.paraphraser_steps >= 1, "paraphraser_steps", f"must be >= 1, got {self.paraphraser_steps}")
        check(self.paraphraser_lr > 0, "paraphraser_lr", f"must be > 0, got {self.paraphraser_lr}")

    def own_needs(self) -> Needs:
        return Needs(taps=frozenset([self.student_tap]), teacher=True, teacher_taps=frozenset([self.teacher_tap]),
                     teacher_stages=(ParaphraserStage(self),))

    def check(self, peers, teacher) -> None:
        MethodConfig.check(self, peers, teacher)
        self.check_taps([self.student_tap], "method.student_tap",
                        [(f"peers.{i}", p.model) for i, p in enumerate(peers)])
        self.check_taps([self.teacher_tap], "method.teacher_tap", [("teacher", teacher.model)])


def _layers(shape: tuple[int, ...]):
    """(convolution, transposed convolution) for a map of `shape` (channels first, batch excluded);
    a vector tap gets linear layers."""
    spatial = len(shape) - 1
    if spatial == 0:
        return (lambda a, b: nn.Linear(a, b)), (lambda a, b: nn.Linear(a, b))
    conv, deconv = {1: (nn.Conv1d, nn.ConvTranspose1d), 2: (nn.Conv2d, nn.ConvTranspose2d)}[spatial]
    return (lambda a, b: conv(a, b, 3, padding=1)), (lambda a, b: deconv(a, b, 3, padding=1))


def _encoder(layer, channels: int, inner: int, factor: int) -> nn.Sequential:
    """channels → inner → factor → factor, each followed by LeakyReLU(0.1)."""
    return nn.Sequential(layer(channels, inner), nn.LeakyReLU(0.1), layer(inner, factor), nn.LeakyReLU(0.1),
                         layer(factor, factor), nn.LeakyReLU(0.1))


def factor_channels(shape: tuple[int, ...], rate: float) -> int:
    return max(1, int(round(shape[0] * rate)))


class Paraphraser(nn.Module):
    """The teacher side: an autoencoder whose bottleneck (`encode`) is the teacher's factor."""

    def __init__(self, shape: tuple[int, ...], rate: float):
        super().__init__()
        conv, deconv = _layers(shape)
        c, k = shape[0], factor_channels(shape, rate)
        self.encoder = _encoder(conv, c, c, k)
        self.decoder = nn.Sequential(deconv(k, k), nn.LeakyReLU(0.1), deconv(k, c), nn.LeakyReLU(0.1),
                                     deconv(c, c), nn.LeakyReLU(0.1))

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        return self.encoder(t)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(t))


class Translator(nn.Module):
    """The student side: the paraphraser's encoder shape from the student's channels to the
    teacher's factor channels, pooled to the teacher's map size when the maps differ."""

    def __init__(self, own: tuple[int, ...], target: tuple[int, ...], rate: float):
        super().__init__()
        check(len(own) == len(target), "method.student_tap",
              f"the student's map {list(own)} and the teacher's {list(target)} have different ranks")
        conv, _ = _layers(own)
        self.size = tuple(target[1:])
        self.encoder = _encoder(conv, own[0], own[0], factor_channels(target, rate))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        out = self.encoder(s)
        if out.shape[2:] != self.size:
            pool = F.adaptive_avg_pool1d if out.dim() == 3 else F.adaptive_avg_pool2d
            out = pool(out, self.size)
        return out


class ParaphraserStage(TeacherStage):
    """Trains the paraphraser on the teacher's map; serves the factor E(t) as `ft.factor.<tap>`."""

    name = "paraphraser"

    def __init__(self, config: FTConfig):
        self.config = config
        self.tap = config.teacher_tap
        self.taps = frozenset([self.tap])
        self.steps = config.paraphraser_steps
        self.served = f"ft.factor.{self.tap}"

    def settings(self) -> dict:
        c = self.config
        return {"tap": self.tap, "rate": c.rate, "steps": c.paraphraser_steps, "lr": c.paraphraser_lr,
                "loss": c.paraphraser_loss}

    def build(self, teacher_shapes):
        return Paraphraser(teacher_shapes[self.tap], self.config.rate)

    def optimizer(self, params):
        return torch.optim.SGD(params, lr=self.config.paraphraser_lr, momentum=0.9, weight_decay=5e-4)

    def loss(self, module, teacher):
        t = teacher[self.tap].float()
        distance = F.l1_loss if self.config.paraphraser_loss == "l1" else F.mse_loss
        return distance(module(t), t)

    def serve(self, module, teacher):
        return {self.served: module.encode(teacher[self.tap])}


@register_method("ft")
class FactorTransfer(Method):
    config_class = FTConfig

    def __init__(self, config, top_k=None):
        super().__init__(config, top_k)
        self.stage = next(s for s in self.needs.teacher_stages if isinstance(s, ParaphraserStage))

    def own_network(self, model, model_name, tap_shapes):
        # The translator trains with the student: in its network, optimizer and checkpoints. The
        # paraphraser is the teacher's side: frozen, served by the engine, in none of them.
        c = self.config
        model.add_module(TRANSLATOR, Translator(tap_shapes["own"][c.student_tap],
                                                tap_shapes["teacher"][c.teacher_tap], c.rate))
        return model

    def distill_terms(self, s):
        translator = s.network.get_submodule(TRANSLATOR)
        value = factor_distance(translator(s.taps[self.config.student_tap]), s.teacher[self.stage.served])
        return self.config.weight * value, {"ft": value.detach()}
