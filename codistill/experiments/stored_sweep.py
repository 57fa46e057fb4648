"""A sweep stored under its name (`sweep.yaml`, beside Ray Tune's own experiment state) against
the sweep asked for: a re-run resumes it only when it is the same sweep (where it runs and how it
is watched may change, not what it trains and searches); otherwise the CLI refuses it in one line
and a comparison's tuning moves it aside and starts anew. And what Ray's restore is given of it."""

from __future__ import annotations

import logging
import time

from codistill.config import ConfigError, ExperimentConfig, first_difference, load_config, load_yaml, shaped_like, to_dict
from codistill.lease import LEASE_FILE
from codistill.storage import RunStorage, resolve_storage_path

SWEEP_FILE = "sweep.yaml"
logger = logging.getLogger(__name__)


def _stored_sweep_differs(cfg: ExperimentConfig, storage: RunStorage) -> str | None:
    """The first setting in which `cfg` differs from the sweep stored under its name (None: the
    same sweep). Where it runs (`ray`) may change; what it trains and searches may not."""
    try:
        stored = to_dict(load_config(load_yaml(storage.read_bytes(SWEEP_FILE).decode())))
    except Exception as err:  # noqa: BLE001 — missing or unreadable: it cannot be shown to be the same sweep
        return f"{SWEEP_FILE} (it cannot be read: {type(err).__name__})"
    found = first_difference(*({k: v for k, v in d.items() if k not in ("ray", "name", "tracking")} for d in (to_dict(cfg), stored)))
    return found[0] if found else None


def refuse_a_changed_sweep(cfg: ExperimentConfig) -> None:
    """The CLI's rules, checked before Ray starts: a sweep another live driver runs, and a sweep
    stored under `cfg.name` that differs from `cfg`, are refused in one line (`run_sweep` takes
    the lease and checks again, where compare's tuning restarts a changed sweep)."""
    import ray.tune

    from codistill.lease import RunLease

    storage = RunStorage(resolve_storage_path(cfg.ray.storage_path), cfg.name)
    RunLease(storage).refuse_if_held()
    if ray.tune.Tuner.can_restore(storage.uri):
        _refuse_if_changed(cfg, storage)


def _refuse_if_changed(cfg: ExperimentConfig, storage: RunStorage) -> bool:
    """True when the stored sweep is the one asked for; a ConfigError naming the first difference if not."""
    changed = _stored_sweep_differs(cfg, storage)
    if changed is not None:
        raise ConfigError(changed.split(" ")[0], f"differs from the sweep stored as {storage.uri}/{SWEEP_FILE}; a "
                          "sweep re-run under its name resumes only with the same settings. Choose another `name` "
                          "to start a new sweep.")
    return True


def resume_or_start(cfg: ExperimentConfig, storage: RunStorage, experiment: str, on_change: str, lease) -> bool:
    """True when the sweep stored under the name is the one asked for and resumes. A different
    one is refused (`on_change="refuse"`, the CLI) or moved aside to start anew ("restart",
    compare's tuning, which has already decided that the stored tuning is not the one asked)."""
    import ray.tune

    if not ray.tune.Tuner.can_restore(experiment):
        return False
    if on_change == "refuse":
        return _refuse_if_changed(cfg, storage)
    changed = _stored_sweep_differs(cfg, storage)
    if changed is None:
        return True
    aside = f"{cfg.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    logger.warning("the sweep stored as %s differs in %s: moved to %s, starting anew", storage.uri, changed, aside)
    RunStorage(storage.storage_path, "").move(cfg.name, aside)
    lease.renew()  # the lease went aside with the folder: held again where the new sweep runs
    RunStorage(storage.storage_path, aside).delete(LEASE_FILE)
    return False


def as_stored(base, storage: RunStorage):
    """`base` in the shape of the stored sweep's: Ray's restore takes only a space with the keys the
    sweep began with, and a setting added to the schema since (its default: the sweep was found
    the same) is left out — its trials read it back as today's schema reads any stored config."""
    return shaped_like(base, {**load_yaml(storage.read_bytes(SWEEP_FILE).decode()), "tune": None})
