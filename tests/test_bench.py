"""The benchmarks' arithmetic: a paired ratio and its interval, and a step's parts adding up
to the step (speed itself is measured by `codistill bench`, never by a timed test)."""

import json
import random

import pytest

from codistill.bench.common import paired_ratio
from codistill.cli import main


def blocks(ratio: float, pairs: int, noise: float, seed: int) -> tuple[list[float], list[float]]:
    """Paired block times with a shared drift (the machine) and independent noise."""
    rng = random.Random(seed)
    base, other = [], []
    for _ in range(pairs):
        drift = rng.uniform(0.5, 2.0)  # a shared machine slows both blocks of a pair together
        base.append(drift * (1 + rng.gauss(0, noise)))
        other.append(drift * ratio * (1 + rng.gauss(0, noise)))
    return base, other


def test_a_paired_ratio_recovers_the_true_ratio_through_drift():
    r = paired_ratio(*blocks(1.04, 60, 0.01, seed=1))
    assert r["low"] <= 1.04 <= r["high"] and r["pairs"] == 60
    assert r["high"] - r["low"] < 0.02  # enough pairs to resolve a few per cent


def test_its_interval_narrows_with_more_pairs_and_is_reproducible():
    few, many = paired_ratio(*blocks(1.0, 8, 0.05, seed=2)), paired_ratio(*blocks(1.0, 200, 0.05, seed=2))
    assert many["high"] - many["low"] < few["high"] - few["low"]
    assert paired_ratio(*blocks(1.0, 8, 0.05, seed=2)) == few


@pytest.mark.slow  # > 1.5 s: the full tier
def test_bench_step_reports_every_variant_and_parts_that_add_up(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert main(["bench", "step", "--rounds", "2", "--block", "3", "--set", "train.steps=100",
                 "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["variants"]) == {"fp32, data on cpu", "fp32, data on device", "bf16, data on cpu",
                                        "bf16, data on device"}
    for row in figures["variants"].values():
        assert row["samples_per_s_per_peer"] > 0
        assert sum(row["parts_ms"].values()) == pytest.approx(row["step_ms"], rel=0.5)
    assert "samples/s" in capsys.readouterr().out


def test_a_steps_parts_partition_its_time(tmp_path):
    from tests.test_device_step import one_step
    from tests.conftest import small_config

    for peer in one_step(small_config(tmp_path)):
        record = peer["record"]
        parts = sum(record[p] for p in ("data_ms", "forward_ms", "exchange_ms", "backward_ms", "optimizer_ms"))
        assert parts <= record["step_ms"] and parts >= 0.9 * record["step_ms"]


def test_bench_codistill_refuses_a_block_that_cuts_a_round(capsys):
    assert main(["bench", "codistill", "--block", "30"]) == 2  # period 50's round would be cut
    assert "--block 30" in capsys.readouterr().err


@pytest.mark.slow  # > 1.5 s: the full tier
def test_bench_codistill_blocks_have_the_steps_asked_for():
    from codistill.bench.codistill import _codistill_overhead

    one = _codistill_overhead([5], 1, block_steps=10)[5]  # 2 blocks of 10 steps, rounds of 5
    assert one["steps_per_arm"] == 10 and one["independent_ms"] > 0 and one["codistill_ms"] > 0


def test_the_bare_arm_does_the_frameworks_work_and_is_timed_beside_it():
    """`codistill bench bare` compares like with like: from the same weights on the same batch,
    the bare PyTorch loop's first DML loss equals the framework's; then both arms are timed in
    paired blocks (the local runner; the Ray half runs the same functions in Ray Train workers)."""
    import torch

    from codistill.bench.bare import NO_EVALUATION, ThreadGather, _arms, summarise, time_arms
    from codistill.bench.common import DEMO_CONFIG
    from codistill.engine.threads import raise_first_error, run_in_threads
    from codistill.exchange import LocalGatherHub

    spec = {"config": DEMO_CONFIG, "overrides": NO_EVALUATION, "peers": 2, "steps": 1_000_000}
    hub, gather = LocalGatherHub(2), ThreadGather(2)
    arms = [_arms(spec, k, torch.device("cpu"), hub.exchange_for(k), gather.for_peer(k)) for k in range(2)]
    for k in range(2):
        framework, bare = arms[k]["framework"].__self__, arms[k]["bare"].__self__
        bare.order = framework.job.schedule.indices(0)  # the framework's first batch

    def first_losses(k):
        return float(arms[k]["framework"](0)["loss"]), float(arms[k]["bare"](0))

    losses = raise_first_error(run_in_threads(first_losses, 2, torch_threads=1))
    for framework_loss, bare_loss in losses:
        assert bare_loss == pytest.approx(framework_loss, rel=1e-5)
    times = raise_first_error(run_in_threads(lambda k: time_arms(arms[k], rounds=2, block=2), 2, torch_threads=1))
    row = summarise(times[0])
    assert row["framework_over_bare"]["pairs"] == 2 and row["bare_ms"] > 0 and row["framework_ms"] > 0
