"""The `method:` section's base: what every method config shares, and the traits a method
declares about itself so that the rest of the config (and `compare`) can ask instead of
naming methods.

The config knows no method. A method file defines its config as a subclass of
`MethodConfig`; `register_method` (in `codistill.methods`) puts that class in
`METHOD_CONFIGS` under the method's name, and the builder picks the class from there by
`method.name`. The traits are class attributes (fixed per method) or properties (where the
answer depends on the settings, e.g. `branches`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from codistill.errors import ConfigError, check
from codistill.registry import Registry


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
    reads_feature_taps: ClassVar[bool] = False
    """True for methods that read feature taps (forward hooks on named layers)."""
    exchanges_in_rounds: ClassVar[bool] = False
    """True for methods whose peers meet only every so many steps (`Needs.rounds`:
    codistillation): on Ray each peer is then its own Ray Train run, of its own size."""

    @classmethod
    def choose_class(cls, data: dict, path: str) -> tuple[type, str]:
        """The config class of the method `data["name"]` names (the builder's registry hook)."""
        key = f"{path}.name" if path else "name"
        check("name" in data, key, f"is required; registered methods: {', '.join(METHOD_CONFIGS.names())}")
        return METHOD_CONFIGS.get(data["name"], key), f"method {data['name']!r}"

    @property
    def uses_teacher(self) -> bool:
        return False

    @property
    def trains_one_network(self) -> bool:
        """True when the method trains one network whose branches are the group's members
        (ONE, KDCL, OKDDip, PCL with `branches ≥ 2`): such a run has exactly one peer."""
        return False

    @property
    def reads_taps(self) -> bool:
        """Whether this method or any of its `also` terms reads feature taps."""
        return self.reads_feature_taps or any(extra.reads_taps for extra in self.also)

    def learns_from_teacher(self) -> bool:
        """Whether this method or any of its `also` terms uses a frozen teacher."""
        return self.uses_teacher or any(extra.learns_from_teacher() for extra in self.also)

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
    """The registered methods whose config class has `trait` set, sorted (for error messages)."""
    return sorted(name for name, config_class in METHOD_CONFIGS.items() if getattr(config_class, trait))
