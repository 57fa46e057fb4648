"""Shared fixtures. One real local Ray instance per test session (never address='auto')."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import time

import pytest

from codistill.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Nothing is ever downloaded: Hugging Face models and tokenizers in tests are built here. Set
# before Ray starts, so its workers inherit it too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# One time scale for every time limit in the tests. A limit is a guard against a hang, never a
# claim about speed, so it must hold on the slowest machine of the kind: every limit is written
# for the development machine (AMD EPYC, 2 cores, idle) and multiplied by how much slower this
# machine runs a reference piece of work right now (a busy neighbour counts), times
# CODISTILL_TEST_TIME_SCALE (default 1), which CI can raise.
REFERENCE_BLOCK_S = 0.107  # 20 Adam steps of the MNIST-1D CNN on a batch of 100, 2 threads, idle


@functools.cache
def time_scale() -> float:
    import torch

    from codistill.models import create_model

    generator_state = torch.get_rng_state()
    torch.manual_seed(0)
    model = create_model("mnist1d_cnn", 10)
    torch.set_rng_state(generator_state)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(100, 1, 40), torch.arange(100) % 10

    def block() -> float:
        started = time.perf_counter()
        for _ in range(20):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        return time.perf_counter() - started

    block()  # warm-up
    measured = sorted(block() for _ in range(5))[2] / REFERENCE_BLOCK_S
    return min(max(1.0, measured), 5.0) * float(os.environ.get("CODISTILL_TEST_TIME_SCALE", "1"))


def scaled(seconds: float) -> float:
    """A time limit written for the development machine, for this one."""
    return seconds * time_scale()


@contextlib.contextmanager
def phase(name: str, seconds: float):
    """A named, scaled time limit for one phase of a test: yields the limit (for a subprocess's
    `timeout=`), and a limit that fires fails the test naming the phase, not a bare TimeoutExpired."""
    limit = scaled(seconds)
    try:
        yield limit
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: not done within {limit:.0f} s ({seconds} s × time scale {time_scale():.2f}; "
                    "raise CODISTILL_TEST_TIME_SCALE on a slow machine)", pytrace=False)


def wait_until(condition, name: str, seconds: float, alive: subprocess.Popen | None = None, poll: float = 0.2) -> None:
    """Poll `condition` until it holds; fail naming the phase when the scaled limit passes, or at
    once (with its output) when the process `alive` it waits on has ended."""
    limit = scaled(seconds)
    deadline = time.monotonic() + limit
    while not condition():
        if alive is not None and alive.poll() is not None:
            pytest.fail(f"{name}: the run ended first (exit {alive.returncode}):\n{alive.stdout.read()[-4000:]}",
                        pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"{name}: not within {limit:.0f} s ({seconds} s × time scale {time_scale():.2f})", pytrace=False)
        time.sleep(poll)


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
    start Ray some other way (the CLI in a subprocess) carry `@pytest.mark.ray` themselves. A
    `gpu` test is skipped where there is no CUDA device."""
    cuda = None
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("gpu") is not None:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device (pytest -m gpu on a GPU machine)"))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # The dashboard hosts Ray's state API, which Ray Train's placement-group cleaner needs:
        # without it, a trial that Tune's ASHA stops leaks its peers' reserved CPUs and the
        # next trial waits for them forever.
        from codistill.engine.ray.connect import private_instance_env

        with private_instance_env():  # as codistill starts its own private instance
            ray.init("local", num_cpus=2, include_dashboard=True, object_store_memory=150 * 2**20,
                     log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (a SQLite store in a temporary folder), one for
    the whole session: its start migrates the store, seconds each time; every test that uses it
    names an experiment of its own."""
    from codistill.bench.mlflow_server import mlflow_server as serve, server_command

    command = server_command()
    if command is None:
        pytest.skip("no MLflow server installed: `make test` installs one in .venv-mlflow (or set CODISTILL_MLFLOW_SERVER)")
    with serve(str(tmp_path_factory.mktemp("mlflow")), command, start_s=scaled(90)) as uri:
        yield uri


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
    from codistill import lease

    monkeypatch.setattr(lease, "SETTLE_S", 0.02)
