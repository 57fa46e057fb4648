"""Independent training: cross-entropy only. The baseline every benchmark compares against."""

from dataclasses import dataclass
from typing import ClassVar

from codistill.methods.base import Method, MethodConfig, register_method


@dataclass(frozen=True, kw_only=True, slots=True)
class IndependentConfig(MethodConfig):
    composable: ClassVar[bool] = False  # adds nothing to another method


@register_method("independent")
class Independent(Method):
    config_class = IndependentConfig
