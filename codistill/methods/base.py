"""What every method shares: its config base, what it declares it needs, the signals the
engine serves it each step, and the registry.

The seam between methods and the engine: a method *declares* what it consumes (`Needs`):
feature taps of its own network, its peers' payloads every step, stale peers' payloads per
round (codistillation), a frozen teacher's outputs. The engine serves each of them into one
`Signals` object per step without knowing which method asked, and the method turns the
signals into a loss. Payloads are named tensors (`{"logits": …, "attention.conv2": …}`);
how they travel is the transport's business.

Methods compose: `also: [{name: at}, …]` adds other methods' distillation terms (without
their cross-entropy) to a method's loss, their needs and payloads merged with its own, so
KD + AT or DML + AT needs no file of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
import torch.nn.functional as F

from codistill.config.method import METHOD_CONFIGS, MethodConfig, Needs, RoundSpec  # noqa: F401 (re-exported)
from codistill.errors import check
from codistill.methods.losses import linear_rampup, top_k_targets
from codistill.methods.sampled_targets import sampled_draws, sampled_targets
from codistill.registry import Registry


class TeacherStage:
    """A network a method trains on its frozen teacher's taps BEFORE any peer trains, then only
    reads (factor transfer's paraphraser). The engine trains it once per run, stores it under the
    run keyed by the teacher file's content and `settings()`, and each step serves
    `serve(module, teacher outputs)` beside the teacher's outputs. Like the teacher, it is in no
    peer's optimizer and no peer's checkpoint: it is frozen while the peers train.

    Its `taps` must be among the method's `Needs.teacher_taps` too (served every step)."""

    name: str = "stage"
    """Names its file and its records (`<run>/stages/<name>-….pt`, `.parquet`)."""
    taps: frozenset[str] = frozenset()
    """The teacher taps it reads."""
    steps: int = 0
    """How many batches of the training set (the run's batch size, its own order from the seed)."""

    def settings(self) -> dict:
        """Everything the trained network depends on besides the teacher, the data and the seed."""
        raise NotImplementedError

    def build(self, teacher_shapes: dict[str, tuple[int, ...]]) -> nn.Module:
        """The untrained network, from the shapes (one example, batch excluded) of the teacher's taps."""
        raise NotImplementedError

    def optimizer(self, params) -> torch.optim.Optimizer:
        raise NotImplementedError

    def loss(self, module: nn.Module, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stage's objective on one batch of the teacher's outputs (its taps, detached)."""
        raise NotImplementedError

    def serve(self, module: nn.Module, teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the frozen network adds to the teacher's outputs each step (named tensors)."""
        raise NotImplementedError


@dataclass
class Signals:
    """Everything a method's loss may use at one step of one peer. Tensors from peers and the
    teacher arrive detached: a peer learns from them but never pushes gradients into them."""

    network: nn.Module
    """The peer's own live network (where a method's trainable modules, e.g. regressors, live)."""
    outputs: Any
    """The network's forward output (logits, or a method's richer output)."""
    logits: torch.Tensor
    labels: torch.Tensor
    step: int
    peer: int = 0
    seed: int = 0
    taps: dict[str, torch.Tensor] = field(default_factory=dict)
    peers: list[dict[str, torch.Tensor]] = field(default_factory=list)
    """The other peers' payloads (every step, or stale per round), in peer order."""
    teacher: dict[str, torch.Tensor] | None = None
    """The frozen teacher's `logits`, the taps the method asked for (and `norm.<tap>.*`, see `Needs`)."""
    indices: torch.Tensor | None = None
    """The training-set indices of this step's examples (rows of `labels`, in order): the batch
    schedule's, so the same in every runner and after a resume (CRD's memory bank reads them)."""
    label_smoothing: float = 0.0
    """`train.label_smoothing`: what every cross-entropy with the labels smooths them by."""

    def cross_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """The cross-entropy of `logits` with this step's labels, smoothed as the run asks: the
        one way a method takes it, so `train.label_smoothing` reaches every such term."""
        return F.cross_entropy(logits, self.labels, label_smoothing=self.label_smoothing)

    def generator(self) -> torch.Generator:
        """Random numbers for this step and peer, the same in every runner and after a resume."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.step) * 1_009 + self.peer + 7)


def weighted_kl(kl: torch.Tensor, weight: float, **unweighted: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """A distillation term w·KL (plus `unweighted` terms, e.g. an ensemble's CE) and what its
    record holds: the parts detached, under the keys every method's table uses (kl, kl_weight)."""
    total = weight * kl + sum(unweighted.values())
    return total, {**{name: term.detach() for name, term in unweighted.items()}, "kl": kl.detach(), "kl_weight": weight}


@dataclass(frozen=True, kw_only=True, slots=True)
class DistillConfig(MethodConfig):
    temperature: float = 1.0
    """Softmax temperature T of the soft targets (> 0)."""
    weight: float = 1.0
    """Weight of the distillation term against the cross-entropy."""
    rampup_steps: int = 0
    """Ramp the distillation weight linearly from 0 over this many steps (0: no ramp)."""

    def __post_init__(self):
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        check(self.rampup_steps >= 0, "rampup_steps", f"must be >= 0, got {self.rampup_steps}")

    def weight_at(self, step: int) -> float:
        return self.weight * linear_rampup(step, self.rampup_steps)


@dataclass(frozen=True, kw_only=True, slots=True)
class TeacherTapConfig(MethodConfig):
    """A term between one feature tap of the student and one of a frozen teacher only (FitNets'
    hint): subclasses declare the fields `student_tap` and `teacher_tap`. Terms that may take the
    other peers' taps instead are `methods/sourced.py`'s."""

    can_use_teacher: ClassVar[bool] = True

    def own_needs(self) -> Needs:
        return Needs(taps=frozenset([self.student_tap]), teacher=True, teacher_taps=frozenset([self.teacher_tap]))

    def check(self, peers, teacher) -> None:
        MethodConfig.check(self, peers, teacher)
        self.check_taps([self.student_tap], "method.student_tap", [(f"peers.{i}", p.model) for i, p in enumerate(peers)])
        self.check_taps([self.teacher_tap], "method.teacher_tap", [("teacher", teacher.model)])


class Method:
    """A training objective for one peer: plain PyTorch, nothing of Ray or of how signals arrive.

    Subclasses set `config_class` (whose `own_needs()` declares what the method consumes), and give either `distill_terms`
    (added to the cross-entropy) or a whole `own_loss`. Terms are returned for the records as
    detached tensors or floats (the loop converts them in bulk, so a GPU is not synchronised
    every step)."""

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    top_k: tuple[int, torch.dtype] | None = None
    """(k, value dtype): send the logits as top-k soft targets (`exchange.top_k`, given by the
    engine when it creates the method)."""
    sent_targets: str = "top_k"
    """`exchange.targets` (not `targets`: methods/sourced.py's have a `targets()`): with `top_k` set,
    `top_k` sends the k largest probabilities and a tail, `sampled` as many draws from the
    distribution as fit the same bytes (`sampled_targets`)."""

    def __init__(self, config: MethodConfig, top_k: tuple[int, torch.dtype] | None = None):
        self.config = config
        self.top_k = top_k
        self.also = [create_method(extra) for extra in config.also]
        self.needs = config.needs  # declared by the config: the driver reads it without a method

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "own_needs" in vars(cls):  # where needs were declared until stop 37
            raise TypeError(f"{cls.__name__}.own_needs: a method's needs are declared by its config class now "
                            f"(define own_needs on {cls.config_class.__name__}, reading self.<setting>), so the "
                            "driver can read them without building the method")

    # -- what the method declares -----------------------------------------------------------

    def own_network(self, model: nn.Module, model_name: str, tap_shapes: dict) -> nn.Module:
        """The network this method trains, built around a registered model (default: itself)."""
        return model

    def logits(self, outputs) -> torch.Tensor:
        """The peer's class logits within the network's output."""
        return outputs

    def evaluation_heads(self, outputs) -> dict[str, torch.Tensor]:
        """Test logits of each head of the network; the first stands for the peer."""
        return {"model": self.logits(outputs)}

    def own_payload(self, logits: torch.Tensor, outputs, taps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": logits}

    def distill_terms(self, s: Signals) -> tuple[torch.Tensor | float, dict]:
        """The weighted distillation loss and its record terms (no cross-entropy)."""
        return 0.0, {}

    def evaluation_members(self, heads: dict[str, torch.Tensor]) -> list[str]:
        """The heads that are members of the group (what a comparison counts as peers): the
        peer's own head, or the branches of a network that holds several."""
        return [next(iter(heads))]

    def after_update(self, network: nn.Module, step: int) -> None:
        """Called after each optimizer step of the peer (a temporal mean's update)."""

    def own_loss(self, s: Signals) -> tuple[torch.Tensor, dict]:
        ce, ce_terms = self._cross_entropy(s)
        extra, terms = self.distill_terms(s)
        return ce + extra, {**ce_terms, **terms}

    @staticmethod
    def _cross_entropy(s: Signals) -> tuple[torch.Tensor, dict]:
        ce = s.cross_entropy(s.logits)
        return ce, {"ce": ce.detach()}

    # -- what the engine calls ---------------------------------------------------------------

    def build_network(self, model: nn.Module, model_name: str, tap_shapes: dict | None = None) -> nn.Module:
        """`tap_shapes`: {"own": {tap: shape}, "teacher": {tap: shape}, "peers": [{tap: shape} of each
        other peer, in peer order]} of one example, for methods whose trainable modules depend
        on them (FitNets' regressors, CRD's heads), and
        "train_labels": the training set's labels (a method keeping state per example, CRD's
        memory bank, sizes it from them; absent where no training set is at hand)."""
        network = self.own_network(model, model_name, tap_shapes or {})
        for extra in self.also:
            network = extra.build_network(network, model_name, tap_shapes)
        return network

    def payload(self, outputs, taps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a peer sends its peers (named tensors, detached)."""
        logits = self.logits(outputs)
        sent = self.own_payload(logits, outputs, taps)
        for extra in self.also:
            sent.update(extra.own_payload(logits, outputs, taps))
        return self.sendable(sent)

    def sendable(self, sent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The payload as it travels: detached, and its logits cut to top-k or sampled soft targets
        (at this method's temperature) when `exchange.top_k` asks for it."""
        sent = {name: t.detach() for name, t in sent.items()}
        if self.top_k is not None and "logits" in sent:
            k, dtype = self.top_k
            if self.sent_targets == "sampled":
                sent.update(sampled_targets(sent.pop("logits"), sampled_draws(k, dtype), self.config.temperature))
            else:
                sent.update(top_k_targets(sent.pop("logits"), k, self.config.temperature, dtype))
        return sent

    def loss(self, s: Signals) -> tuple[torch.Tensor, dict]:
        total, terms = self.own_loss(s)
        added, extra_terms = self._also_terms(s)
        total = total + added
        return total, {"loss": total.detach(), **terms, **extra_terms}

    def _also_terms(self, s: Signals) -> tuple[torch.Tensor | float, dict]:
        total, terms = 0.0, {}
        for extra in self.also:
            added, extra_terms = extra.distill_terms(s)
            total = total + added
            terms.update(extra_terms)
        return total, terms


class StagedTerm(Method):
    """A distillation term that a paper first trains alone (FitNets' hints, FSP's flow): for the
    first `stage_steps()` steps the loss is the term alone, then CE + weight · term."""

    term: ClassVar[str]

    def stage_steps(self) -> int:
        return 0

    def term_loss(self, s: Signals) -> torch.Tensor:
        raise NotImplementedError

    def distill_terms(self, s):
        value = self.term_loss(s)
        return self.config.weight * value, {self.term: value.detach()}

    def own_loss(self, s):
        if s.step < self.stage_steps():
            value = self.term_loss(s)
            ce = s.cross_entropy(s.logits)
            return value, {"ce": ce.detach(), self.term: value.detach()}
        return super().own_loss(s)


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    """Register a method class under `name`, and its `config_class` under the same name for
    the config (which reads a method's traits from its config class and imports no method)."""
    def decorator(cls: type[Method]):
        METHODS.add(name, cls, cls.__module__)
        METHOD_CONFIGS.add(name, cls.config_class, cls.__module__)
        return cls
    return decorator


def create_method(config: MethodConfig, top_k: tuple[int, torch.dtype] | None = None,
                  targets: str = "top_k") -> Method:
    """The method `config` names; `top_k` (k, value dtype): it sends its logits as top-k soft
    targets (`exchange.top_k`; given only when set, so a method of your own whose `__init__`
    takes the config alone still works without it), or in their bytes as sampled ones
    (`targets`: `exchange.targets`)."""
    method_class = METHODS.get(config.name, "method.name")
    method = method_class(config, top_k=top_k) if top_k is not None else method_class(config)
    method.sent_targets = targets
    return method
