"""Terms that learn from a frozen teacher or, online, from the other peers (config `source:
teacher | peers`): attention transfer, the overhaul, CRD, logit regression.

Where a target comes from is configuration handed to one base, not a branch inside each loss.
A method writes what a peer sends (`peer_payload`: named tensors, e.g. `attention.<tap>`); the
teacher's outputs are put into the same names (`teacher_target`: by default the same function on
the teacher's taps), so the teacher reads like one more peer and the loss is written once over
`targets(s)` — the teacher's one target, or every other peer's payload in peer order:

    from a teacher:  targets = [teacher_target(teacher's outputs)]      sent to peers: nothing
    between peers:   targets = [payload of each other peer]             sent to peers: peer_payload

A method's taps are pairs (its own tap, the teacher's tap it is compared with: `tap_pairs`);
between peers a target's taps carry the peer's own tap names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from codistill.config.method import MethodConfig
from codistill.errors import check
from codistill.methods.base import Method, Needs, Signals


@dataclass(frozen=True, kw_only=True, slots=True)
class SourcedConfig(MethodConfig):
    """A term whose targets are a frozen teacher's or the other peers'."""

    can_use_teacher: ClassVar[bool] = True
    term: ClassVar[str] = "this term"
    """What the method is called in messages ("attention transfer")."""
    source: Literal["teacher", "peers"] = "teacher"
    """Whose outputs are the targets: a frozen teacher's, or the other peers' every step."""

    @property
    def uses_teacher(self) -> bool:
        return self.source == "teacher"

    reads_teacher_norms: ClassVar[bool] = False
    """The teacher's batch norms before its taps are read too (the overhaul's margins)."""

    @property
    def tap_pairs(self) -> tuple[tuple[str, str], ...]:
        """(own tap, the teacher's tap compared with it), in the method's order (none: logits only)."""
        return ()

    def own_needs(self) -> Needs:
        """The own taps, and the teacher with its paired taps (and the batch norms before them)
        or the other peers' payloads every step."""
        own = frozenset(own for own, _ in self.tap_pairs)
        if not self.uses_teacher:
            return Needs(taps=own, peers=True)
        theirs = frozenset(t for _, t in self.tap_pairs)
        return Needs(taps=own, teacher=True, teacher_taps=theirs,
                     teacher_norms=theirs if self.reads_teacher_norms else frozenset())

    def check(self, peers, teacher) -> None:
        MethodConfig.check(self, peers, teacher)
        check(self.uses_teacher or len(peers) >= 2, "peers",
              f"{self.term} between peers needs at least 2 peers, got {len(peers)}")

    def check_tap_pairs(self, peers, teacher, own_key: str, teacher_key: str) -> None:
        """Every peer's model declares the own taps; the teacher's (when it is the source) its taps."""
        self.check_taps([own for own, _ in self.tap_pairs], own_key, [(f"peers.{i}", p.model) for i, p in enumerate(peers)])
        if self.uses_teacher:
            self.check_taps([theirs for _, theirs in self.tap_pairs], teacher_key, [("teacher", teacher.model)])


@dataclass(frozen=True, kw_only=True, slots=True)
class TapTargetsConfig(SourcedConfig):
    """Feature taps compared pairwise with the target's (attention transfer, the overhaul)."""

    taps: tuple[str, ...]
    """The peer's feature taps the term compares (e.g. `[conv2, conv3]`)."""
    teacher_taps: tuple[str, ...] = ()
    """The teacher's taps paired with `taps` in order (default: the same names)."""

    def __post_init__(self):
        check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        check(not self.teacher_taps or len(self.teacher_taps) == len(self.taps), "teacher_taps",
              f"pairs with `taps` in order: give {len(self.taps)} names, got {len(self.teacher_taps)}")

    @property
    def tap_pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple(zip(self.taps, self.teacher_taps or self.taps))

    def check(self, peers, teacher) -> None:
        SourcedConfig.check(self, peers, teacher)
        self.check_tap_pairs(peers, teacher, "method.taps", "method.teacher_taps")


class SourcedMethod(Method):
    """A method whose targets come from its config's `source`. Subclasses give `peer_payload`
    (and `teacher_target` when the teacher's form differs from a peer's), and read
    `targets(s)`; `target_shapes`/`matched_shapes` and `hold_per_target` answer
    the other questions whose answer depends on the source."""

    config_class = SourcedConfig

    # -- what the method gives --------------------------------------------------------------

    def peer_payload(self, logits: torch.Tensor, outputs, taps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What this peer sends for the other peers' targets (default: its logits)."""
        return {"logits": logits}

    def teacher_target(self, teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The teacher's outputs in `peer_payload`'s names: the same function, on the teacher's
        logits (None where only taps are served) and its taps renamed to the own taps they pair with."""
        taps = {own: teacher[theirs] for own, theirs in self.config.tap_pairs}
        return self.peer_payload(teacher.get("logits"), teacher, taps)

    # -- what the base answers by source ----------------------------------------------------

    def own_payload(self, logits, outputs, taps):
        # From a teacher the targets are the teacher's: nothing of this peer is anyone's target.
        return {} if self.config.uses_teacher else self.peer_payload(logits, outputs, taps)

    def targets(self, s: Signals) -> list[dict[str, torch.Tensor]]:
        """What this peer distils from, each in `peer_payload`'s names: the teacher's outputs, or
        every other peer's payload in peer order (none when no peer has sent yet)."""
        return [self.teacher_target(s.teacher)] if self.config.uses_teacher else s.peers

    def mean_over_targets(self, s: Signals, term: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        """Σ term(target) / count over `targets(s)` (summed in target order), 0 without a target."""
        values = [term(target) for target in self.targets(s)]
        if not values:
            return torch.zeros((), device=s.logits.device)
        return sum(values) / len(values)

    def target_shapes(self, tap_shapes: dict) -> list[dict[str, tuple[int, ...]]]:
        """{own tap: shape of one example} of each target, in `targets`' order: the teacher's
        paired taps, or each other peer's (peers may differ: a module per target reads each)."""
        if self.config.uses_teacher:
            return [{own: tap_shapes["teacher"][theirs] for own, theirs in self.config.tap_pairs}]
        return tap_shapes["peers"]

    def matched_shapes(self, tap_shapes: dict) -> dict[str, tuple[int, ...]]:
        """{own tap: the shape one module shared by every target maps it to}: the teacher's paired
        tap, or between peers this peer's own (the peers' maps must be alike: the method checks)."""
        if self.config.uses_teacher:
            return self.target_shapes(tap_shapes)[0]
        return {own: tap_shapes["own"][own] for own, _ in self.config.tap_pairs}

    def hold_per_target(self, modules: list[nn.Module]) -> nn.Module:
        """How the network holds one module per target (`target_shapes`' order): the teacher's
        alone, the other peers' in a ModuleList in peer order — the layout checkpoints have."""
        return modules[0] if self.config.uses_teacher else nn.ModuleList(modules)

    def per_target(self, held: nn.Module) -> list[nn.Module]:
        """The modules `hold_per_target` put in the network, in `targets`' order."""
        return [held] if self.config.uses_teacher else list(held)
