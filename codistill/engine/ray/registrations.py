"""What user code registered travels with a run: Ray Train workers and Tune trials import
codistill afresh and would not see models, data sets or methods registered in the user's script
(its __main__, a module beside it, an installed package). The driver collects them here and
every process that runs part of the run adopts them before it reads the config. Ray serialises
them with cloudpickle, so a builder defined in __main__ travels by value."""

from __future__ import annotations

from codistill.config.method import METHOD_CONFIGS
from codistill.data import DATASETS
from codistill.methods import METHODS
from codistill.models import MODELS

REGISTRIES = {"models": MODELS, "methods": METHODS, "method_configs": METHOD_CONFIGS, "datasets": DATASETS}


def user_registrations() -> dict:
    return {key: registry.user_entries() for key, registry in REGISTRIES.items()}


def adopt_registrations(shipped: dict) -> None:
    for key, registry in REGISTRIES.items():
        registry.adopt(shipped.get(key, {}))
