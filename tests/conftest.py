"""Shared fixtures. One real local Ray instance per test session (never address='auto')."""

from __future__ import annotations

import json
import os

import pytest

from codistill.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def committed_step(run_dir) -> int:
    """The newest checkpoint step Ray Train has committed for the Ray Train run in `run_dir` (0:
    none yet): a worker killed before its checkpoint is committed restarts from the one before."""
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            latest = json.load(f).get("latest_checkpoint_result") or {}
    except (FileNotFoundError, ValueError):  # not yet written, or being rewritten
        return 0
    return int(latest.get("metrics", {}).get("step", 0))


def pytest_collection_modifyitems(items):
    """A test is a Ray test when it uses the shared Ray instance, wherever it lives: marked per
    test, so the Ray-free tests of a file about Ray still run in `make test-fast`. Tests that
    start Ray some other way (the CLI in a subprocess) carry `@pytest.mark.ray` themselves."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # The dashboard hosts Ray's state API, which Ray Train's placement-group cleaner needs:
        # without it, a trial that Tune's ASHA stops leaks its peers' reserved CPUs and the
        # next trial waits for them forever.
        from codistill.engine.run import private_instance_env

        with private_instance_env():  # as codistill starts its own private instance
            ray.init("local", num_cpus=2, include_dashboard=True, object_store_memory=150 * 2**20,
                     log_to_driver=False)
    yield ray
    ray.shutdown()


def signals(logits, labels, step=0, peers=(), teacher=None, outputs=None, taps=None, network=None):
    """A step's Signals for a method's loss, from plain tensors (peers as logits or payload dicts)."""
    from torch import nn

    from codistill.methods import Signals

    return Signals(network=network or nn.Identity(), outputs=logits if outputs is None else outputs, logits=logits,
                   labels=labels, step=step, taps=taps or {},
                   peers=[p if isinstance(p, dict) else {"logits": p} for p in peers], teacher=teacher)


def small_config(tmp_path, *overrides: str, base: str = "configs/dml_mnist1d.yaml"):
    """The demo config shortened for tests, writing under tmp_path."""
    return load_config(base if os.path.isabs(base) else os.path.join(REPO, base), [
        "train.steps=120", "train.eval_every=40", "train.checkpoint_every=40",
        f"ray.storage_path={tmp_path}", *overrides])


@pytest.fixture
def make_config(tmp_path):
    return lambda *overrides, **kw: small_config(tmp_path, *overrides, **kw)


@pytest.fixture(autouse=True)
def quick_lease(monkeypatch):
    """In-process runs take their lease with a short settle wait (one process cannot race itself);
    the test of two real processes starting at once runs subprocesses with the real wait."""
    from codistill.engine import lease

    monkeypatch.setattr(lease, "SETTLE_S", 0.02)
