"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020), from a teacher
or between peers.

    v_s = g_s(f_s) / ‖·‖,  v_t = g_t(f_t) / ‖·‖        (linear embedding heads, `feat_dim`-d, unit norm)
    h(v, w) = exp(v·w / τ) / Z                          (Z: fixed on the first step, see below)
    L_side = −Σ_b [ log h⁺/(h⁺ + N/n) + Σ_{k=1..N} log (N/n)/(h_k + N/n) ] / B     (NCE, eq. 18)
    L = CE + β · (L_student_anchor + L_teacher_anchor)

f_s, f_t: the student's and teacher's penultimate features; n: the training set's size; τ =
`temperature`. Each anchor is scored against a memory bank of the OTHER side's embeddings: the
positive is the bank's row of the same example, the N negatives are rows of N examples of other
classes, drawn per example. After scoring, each bank's rows of this batch move towards the new
embeddings, w ← normalise(μ·w + (1 − μ)·v), μ = `momentum`. The constants are the authors'
(RepDistiller `crd/`): Z = mean(h)·n computed once on the first batch and then frozen, 1e-7
inside the NCE's denominators, banks initialised U(±1/√(d/3)), τ 0.07, μ 0.5, β 0.8.

The heads train with the student; the two banks (and Z) are buffers of a module in the student's
network, so they are checkpointed with the peer and restored on resume, and on Ray they live
with the peer that owns them. The batch's example indices come from the engine (`Signals.indices`,
the (seed, step) schedule's), the negatives from the step's generator: a resumed run draws what
an uninterrupted one does.

Between peers (`source: peers`): each peer sends its features every step (`crd.features`,
detached) and holds one contrast memory per other peer j — its own head and bank, and a head and
bank for j's features — so peer j plays the teacher's part above; the term is the mean over the
other peers. Peers of different architectures work: each head reads its side's own width.

Deviations: negatives are drawn with replacement (the authors draw without, when there are
enough); N defaults to 1024, not 16384 — MNIST-1D has 4000 training examples, ~3600 of them of
another class, so the paper's N would exceed the pool (1024 keeps a fraction of the set close to
the paper's 16384 of CIFAR's 50000).
"""

from dataclasses import dataclass
from typing import ClassVar

import math

import torch
import torch.nn.functional as F
from torch import nn

from codistill.errors import ConfigError, check
from codistill.methods.base import register_method
from codistill.methods.losses import contrastive_nce
from codistill.methods.sourced import SourcedConfig, SourcedMethod

CRD_MODULE = "crd"


@dataclass(frozen=True, kw_only=True, slots=True)
class CRDConfig(SourcedConfig):
    term: ClassVar[str] = "CRD"
    student_tap: str = "penultimate"
    """The student's features the embedding head reads (the pooled vector before the classifier)."""
    teacher_tap: str = "penultimate"
    """The teacher's features its embedding head reads."""
    feat_dim: int = 128
    """d: the embedding's size."""
    negatives: int = 1024
    """N: negatives drawn per example (16384 in the paper, on CIFAR's 50000 examples)."""
    temperature: float = 0.07
    """τ of the scores."""
    momentum: float = 0.5
    """μ of the memory banks' update."""
    weight: float = 0.8
    """β: weight of the contrastive term against the cross-entropy (0.8 in RepDistiller's scripts)."""

    @property
    def tap_pairs(self) -> tuple[tuple[str, str], ...]:
        return ((self.student_tap, self.teacher_tap),)

    def check(self, peers, teacher) -> None:
        SourcedConfig.check(self, peers, teacher)
        self.check_tap_pairs(peers, teacher, "method.student_tap", "method.teacher_tap")

    def __post_init__(self):
        check(self.feat_dim >= 1, "feat_dim", f"must be >= 1, got {self.feat_dim}")
        check(self.negatives >= 1, "negatives", f"must be >= 1, got {self.negatives}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")


class ContrastMemory(nn.Module):
    """The two embedding heads and the two memory banks (one row per training example)."""

    def __init__(self, student_dim: int, teacher_dim: int, labels: torch.Tensor, c: CRDConfig):
        super().__init__()
        self.embed_student = nn.Linear(student_dim, c.feat_dim)
        self.embed_teacher = nn.Linear(teacher_dim, c.feat_dim)
        n, bound = len(labels), 1.0 / math.sqrt(c.feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(n, c.feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_teacher", torch.rand(n, c.feat_dim) * 2 * bound - bound)
        # The normalisers, fixed on the first step (0: not yet); buffers, so a resume keeps them.
        self.register_buffer("z_student", torch.zeros(()))
        self.register_buffer("z_teacher", torch.zeros(()))
        self.labels = labels.detach().cpu().long()  # data, not state: not in the state dict
        self.temperature, self.momentum = c.temperature, c.momentum

    def negatives(self, indices: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """(B, k + 1) bank rows: column 0 the example itself, then k examples of other classes,
        uniform with replacement (redrawn until no draw shares the anchor's class)."""
        n, own = len(self.labels), self.labels[indices.cpu()]
        drawn = torch.randint(0, n, (len(indices), k), generator=generator)
        same = self.labels[drawn] == own[:, None]
        while same.any():
            drawn[same] = torch.randint(0, n, (int(same.sum()),), generator=generator)
            same = self.labels[drawn] == own[:, None]
        return torch.cat([indices.cpu().view(-1, 1), drawn], 1)

    def forward(self, f_student: torch.Tensor, f_teacher: torch.Tensor, indices: torch.Tensor,
                contrast: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(NCE with the student as anchor, NCE with the teacher as anchor); updates the banks."""
        v_s = F.normalize(self.embed_student(f_student.flatten(1).float()), dim=1)
        v_t = F.normalize(self.embed_teacher(f_teacher.flatten(1).float()), dim=1)
        contrast = contrast.to(v_s.device)
        # Each anchor against the other side's bank (rows detached: the banks are not trained).
        scores_s = torch.exp(torch.bmm(self.memory_teacher[contrast].detach(), v_s.unsqueeze(2)).squeeze(2) / self.temperature)
        scores_t = torch.exp(torch.bmm(self.memory_student[contrast].detach(), v_t.unsqueeze(2)).squeeze(2) / self.temperature)
        n = len(self.labels)
        if self.z_student.item() == 0:
            self.z_student.fill_(scores_s.detach().mean().item() * n)
            self.z_teacher.fill_(scores_t.detach().mean().item() * n)
        loss_s = contrastive_nce(scores_s / self.z_student, n)
        loss_t = contrastive_nce(scores_t / self.z_teacher, n)
        with torch.no_grad():
            rows = indices.to(v_s.device)
            for bank, v in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
                bank.index_copy_(0, rows, F.normalize(self.momentum * bank[rows] + (1 - self.momentum) * v.detach(), dim=1))
        return loss_s, loss_t


@register_method("crd")
class CRD(SourcedMethod):
    config_class = CRDConfig

    def own_network(self, model, model_name, tap_shapes):
        c = self.config
        if "train_labels" not in tap_shapes:
            raise ConfigError("method.name", "CRD keeps a memory bank of every training example; this run "
                              "builds the network without its training set")
        own = math.prod(tap_shapes["own"][c.student_tap])
        # One memory per target, each head sized from its target's own width (peers may differ).
        memories = [ContrastMemory(own, math.prod(shapes[c.student_tap]), tap_shapes["train_labels"], c)
                    for shapes in self.target_shapes(tap_shapes)]
        model.add_module(CRD_MODULE, self.hold_per_target(memories))
        return model

    def peer_payload(self, logits, outputs, taps):
        return {"crd.features": taps[self.config.student_tap].flatten(1)}

    def distill_terms(self, s):
        c = self.config
        if s.indices is None:
            raise ValueError("CRD needs each batch's example indices (Signals.indices)")
        targets = self.targets(s)
        if not targets:
            return torch.zeros((), device=s.logits.device), {"crd": torch.zeros((), device=s.logits.device)}
        # Summed term by term in target order, not through the base's per-target mean: the sum
        # this term has always been recorded with (they differ in the last bit from two targets on).
        value = 0.0
        for memory, target in zip(self.per_target(s.network.get_submodule(CRD_MODULE)), targets):
            # The same negatives for every target: one draw per step, as from a teacher.
            contrast = memory.negatives(s.indices, c.negatives, s.generator())
            loss_s, loss_t = memory(s.taps[c.student_tap], target["crd.features"], s.indices, contrast)
            value = value + loss_s + loss_t
        value = value / len(targets)
        return c.weight * value, {"crd": value.detach()}
