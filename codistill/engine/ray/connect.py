"""Connecting to Ray: joining a cluster (`--address`, RAY_ADDRESS) or starting the private
instance `codistill` runs its own training on — on the loopback address only, with the
environment its workers need — and leaving it."""

from __future__ import annotations

import os
from contextlib import contextmanager

from codistill.errors import RunError, first_line


def _refused_for_token(err: BaseException | None) -> bool:
    """Ray reports a rejected token only as text inside the chain of connection errors."""
    while err is not None:
        if "InvalidAuthToken" in str(err) or "AuthenticationError" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def connect_ray(address: str | None, log_to_driver: bool = True) -> None:
    """Join `address` (or RAY_ADDRESS), else start a private local instance — never a cluster
    that happens to run on this machine — listening on the loopback address only. The local
    instance runs the dashboard: it hosts the state API that Ray Train's placement-group cleanup
    needs (without it, a trial stopped by ASHA keeps its peers' resources)."""
    import ray

    if ray.is_initialized():
        return
    # `ray job submit --working-dir .` runs this driver from Ray's unpacked copy of the project,
    # and Ray (2.60) unpacks that copy again when the driver connects: for a moment the folder
    # is gone and a lazy `import codistill.…` fails. The Ray runner imports everything a driver
    # needs later at its top level (exchange, coordinators, checkpoints), so importing it first
    # is enough; `codistill tune` has imported `codistill.experiments.tune` before it connects.
    import codistill.engine.ray.runner  # noqa: F401

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=log_to_driver)
        except ConnectionError as err:
            if _refused_for_token(err):
                # Ray never sends a token to an address given explicitly unless told to.
                raise ConnectionError(
                    f"the Ray cluster at {address} uses token authentication and refused this "
                    "connection: export RAY_AUTH_MODE=token, and make the cluster's token readable here "
                    "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN; `ray get-auth-token` on "
                    "the head prints it)") from err
            raise
    else:
        with _loopback_only(), private_instance_env():
            try:
                ray.init(address="local", include_dashboard=True, log_to_driver=log_to_driver,
                         _node_ip_address="127.0.0.1")
            except Exception as err:  # noqa: BLE001 — Ray raises a bare Exception when its start-up times out
                ray.shutdown()  # what did start of the instance
                raise RunError(f"the private Ray instance did not start: {first_line(err, 200)} (an overloaded "
                               "machine does this: retry when it is quieter, or use --backend local)") from None


# Ray Train's controller polls its workers every 2 s (Ray's default): a run's end and each
# checkpoint are seen up to 2 s late, ~5 s of every short run on this machine. A private
# instance has a handful of workers on one machine, so it polls 4× as often; a cluster keeps
# Ray's default (the controller polls every worker of every peer). Ray also starts its workers
# at nice 15, below every ordinary process: on a machine where anything else runs (one busy core
# was enough here), the peers then get a sliver of a core — a 2-core machine with a busy core ran
# a codistillation step ~20× slower. A private instance runs the user's own training, so its
# workers get an ordinary share (niceness 0), as the same training has on the local runner.
# Ray Train also starts a preemption watcher with every run (an actor of its own, a process of
# ~1 s of CPU at each start): it relays a cloud node's drain notice, which the one machine a
# private instance runs on never gets.
PRIVATE_INSTANCE_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_worker_niceness": "0",
                        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@contextmanager
def _environment_put_back(keys):
    """Whatever the block does to the environment variables `keys`, they are as before after it."""
    before = {key: os.environ.get(key) for key in keys}
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def private_instance_env():
    """While a private Ray instance starts: the environment its processes inherit gets
    `PRIVATE_INSTANCE_ENV` (a value the user set wins); put back after."""
    with _environment_put_back(PRIVATE_INSTANCE_ENV):
        for key, value in PRIVATE_INSTANCE_ENV.items():
            os.environ.setdefault(key, value)
        yield


@contextmanager
def _loopback_only():
    """While a private Ray instance starts: its node address is the loopback one, so its servers
    (GCS, raylet, workers, object manager) listen on 127.0.0.1 only, not on every interface —
    token authentication is then not the only thing between them and the network. Ray (2.60)
    keeps a loopback node address only where it thinks clusters are off (macOS, Windows); on
    Linux it swaps 127.0.0.1 for the node's outward address. Its switch for that is read by this
    process (the constant) and by the processes it starts (the environment); both are put back
    after, so joining a cluster later in this process still works."""
    from ray._private import ray_constants

    key = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    constant_before = ray_constants.ENABLE_RAY_CLUSTER
    with _environment_put_back([key]):
        os.environ[key], ray_constants.ENABLE_RAY_CLUSTER = "0", False
        try:
            yield
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = constant_before


def disconnect_ray() -> None:
    import ray

    ray.shutdown()
