"""The `method:` section's base: what every method config shares, and the traits a method
declares about itself so that the rest of the config (and `compare`) can ask instead of
naming methods.

The config knows no method. A method file defines its config as a subclass of
`MethodConfig`; `register_method` (in `codistill.methods`) puts that class in
`METHOD_CONFIGS` under the method's name, and the builder picks the class from there by
`method.name`. The traits are class attributes (fixed per method) or properties (where the
answer depends on the settings, e.g. `trains_one_network`, which follows a peer method's
`branches`).

What a method consumes (`Needs`) is declared here too, once, by its config (`own_needs`): the
driver reads it from the config (does a run exchange in rounds, read feature taps, train
teacher stages first?) without building the method. `exchanges_in_rounds`, `reads_taps` and
`learns_from_teacher` are derived from the needs of the method and its `also` terms, and
`uses_teacher` from the method's own — except where a setting decides it: a sourced term's
`source` (`methods/sourced.py`) gives `uses_teacher`, and its `own_needs` follow from that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from codistill.errors import ConfigError, check
from codistill.registry import Registry


@dataclass(frozen=True)
class RoundSpec:
    """Periodic exchange with bounded staleness: every `period` steps each peer publishes a
    payload (its `predictions` on the coming batches, or its `weights`), and takes every other
    peer's newest publication at most `max_staleness` rounds old. Nothing is exchanged in rounds
    that end before `burn_in`."""

    period: int
    max_staleness: int
    publish: str
    burn_in: int
    wait_timeout_s: float


@dataclass(frozen=True)
class Needs:
    """What a method consumes besides its own network's output."""

    taps: frozenset[str] = frozenset()
    """Named feature taps of its own network (declared by the model registry)."""
    peers: bool = False
    """The other peers' payloads on the same batch, every step (a synchronous exchange)."""
    rounds: RoundSpec | None = None
    """The other peers' stale payloads, exchanged per round."""
    teacher: bool = False
    """A frozen teacher's logits."""
    teacher_taps: frozenset[str] = frozenset()
    """Named feature taps of the teacher's network."""
    teacher_norms: frozenset[str] = frozenset()
    """Teacher taps whose batch norm's affine parameters (γ, β) the method reads: served as
    `norm.<tap>.weight` / `norm.<tap>.bias` beside the teacher's outputs, for the taps whose model
    declares that batch norm (`ModelEntry.norms`); absent for the others."""
    teacher_stages: tuple[Any, ...] = ()
    """Networks trained on the frozen teacher before any peer trains (`methods.TeacherStage`s);
    what each serves arrives beside the teacher's outputs."""

    def __or__(self, other: "Needs") -> "Needs":
        if self.rounds and other.rounds and self.rounds != other.rounds:
            raise ValueError("two methods that each exchange in rounds cannot be combined")
        return Needs(self.taps | other.taps, self.peers or other.peers, self.rounds or other.rounds,
                     self.teacher or other.teacher, self.teacher_taps | other.teacher_taps,
                     self.teacher_norms | other.teacher_norms, self.teacher_stages + other.teacher_stages)


@dataclass(frozen=True, kw_only=True, slots=True)
class MethodConfig:
    name: str
    """Registered method name."""
    also: tuple[MethodConfig, ...] = ()
    """Other methods whose distillation terms are added to this one's loss, e.g. `[{name: at}]`."""

    # -- traits: what the method declares about itself ------------------------------------------
    min_peers: ClassVar[int] = 1
    takes_top_k: ClassVar[bool] = False
    """True for methods whose peers' logits are only ever soft targets (DML, codistillation):
    they can be sent as top-k targets (`exchange.top_k`)."""
    composable: ClassVar[bool] = True
    """False for methods that shape the network or the exchange themselves (and so cannot be an `also` term)."""
    can_use_teacher: ClassVar[bool] = False
    """True for methods that may learn from a frozen teacher (`teacher:`)."""

    # -- what the method consumes: declared once, here --------------------------------------------

    def own_needs(self) -> Needs:
        """What this method (without its `also` terms) consumes, from its settings."""
        return Needs()

    @property
    def needs(self) -> Needs:
        """What the method and its `also` terms consume: what the engine serves each step."""
        needs = self.own_needs()
        for extra in self.also:
            needs = needs | extra.needs
        return needs

    @property
    def exchanges_in_rounds(self) -> bool:
        """Peers that meet only every so many steps (`Needs.rounds`: codistillation): on Ray each
        peer is then its own Ray Train run, of its own size."""
        return self.needs.rounds is not None

    @property
    def reads_taps(self) -> bool:
        """Whether this method or any of its `also` terms reads feature taps (forward hooks on named layers)."""
        needs = self.needs
        return bool(needs.taps or needs.teacher_taps)

    @classmethod
    def choose_class(cls, data: dict, path: str) -> tuple[type, str]:
        """The config class of the method `data["name"]` names (the builder's registry hook)."""
        key = f"{path}.name" if path else "name"
        check("name" in data, key, f"is required; registered methods: {', '.join(METHOD_CONFIGS.names())}")
        return METHOD_CONFIGS.get(data["name"], key), f"method {data['name']!r}"

    @property
    def uses_teacher(self) -> bool:
        """Whether this method itself (without its `also` terms) learns from a frozen teacher."""
        return self.own_needs().teacher

    @property
    def trains_one_network(self) -> bool:
        """True when the method trains one network whose branches are the group's members
        (DML, ONE, KDCL, OKDDip, PCL with `branches ≥ 2`): such a run has exactly one peer."""
        return False

    def learns_from_teacher(self) -> bool:
        """Whether this method or any of its `also` terms uses a frozen teacher."""
        return self.needs.teacher

    def check(self, peers, teacher) -> None:
        """Raise ConfigError (key path from the top of the config) if the peers or teacher do not suit."""
        if len(peers) < self.min_peers:
            raise ConfigError("peers", f"method {self.name!r} needs at least {self.min_peers} peers, got {len(peers)}")
        if self.uses_teacher and teacher is None:
            raise ConfigError("teacher", f"method {self.name!r} learns from a frozen teacher: add a `teacher:` "
                                         "section (`run: <a codistill run>` or `checkpoint: <file>` and `model:`)")
        for i, extra in enumerate(self.also):
            check(extra.composable, f"method.also.{i}.name",
                  f"method {extra.name!r} cannot be added to another; methods that can: {', '.join(registered_with('composable'))}")
            extra.check(peers, teacher)

    def check_taps(self, taps, key: str, models: list[tuple[str, str | None]]) -> None:
        """Every tap in `taps` must be declared by every model in `models` ((where, model name);
        a teacher whose model is not known yet is checked when it is)."""
        from codistill.models import MODELS

        check(len(taps) > 0, key, "name at least one feature tap")
        for where, model in models:
            if model is None:
                continue
            declared = MODELS[model].taps
            for tap in taps:
                check(tap in declared, key, f"model {model!r} ({where}) has no feature tap {tap!r}; "
                      f"its taps: {', '.join(declared) or 'none'}")


METHOD_CONFIGS: Registry[type[MethodConfig]] = Registry("method")
"""Method name → its config class; filled by `codistill.methods.register_method`."""


def registered_with(trait: str) -> list[str]:
    """The registered methods whose config class has `trait` set, sorted (for error messages). A
    trait that follows from the settings (a property) is asked of the method's default settings;
    a method whose config has required settings has no defaults to ask, and is not listed."""
    names = []
    for name, config_class in METHOD_CONFIGS.items():
        value = getattr(config_class, trait)
        if isinstance(value, property):
            try:
                value = value.fget(config_class(name=name))
            except TypeError:  # required settings
                value = False
        if value:
            names.append(name)
    return sorted(names)
