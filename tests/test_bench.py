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


@pytest.mark.slow
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


TINY_LLAMA = [arg for kv in ("vocab_size=1024", "hidden_size=32", "intermediate_size=64", "num_hidden_layers=2",
                             "num_attention_heads=2", "num_key_value_heads=2") for arg in ("--set", kv)]


@pytest.mark.slow  # a world of two gloo processes, each importing torch and transformers: ~10 s
def test_bench_shard_counts_half_the_state_on_an_fsdp_worker_and_times_both(tmp_path, capsys):
    """`codistill bench shard` on a tiny Llama: the table's FSDP row holds at most 0.6 of DDP's
    per-worker state (ideal 1/2), counted from the tensors each rank holds; the shards of the
    parameters add up to the whole model; the step ratio has its pairs."""
    out = tmp_path / "shard.json"
    assert main(["bench", "shard", *TINY_LLAMA, "--workers", "2", "--rounds", "2", "--block", "1",
                 "--out", str(out)]) == 0
    rows = {line.split()[1]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split()[:2] in (["2", "ddp"], ["2", "fsdp"])}
    over_ddp = {s: float(row[row.index("B") + 1]) for s, row in rows.items()}  # the column after the total's bytes
    assert over_ddp["ddp"] == 1.0 and over_ddp["fsdp"] <= 0.6
    figures = json.loads(out.read_text())
    ddp, fsdp = figures["memory"]["ddp_2"], figures["memory"]["fsdp_2"]
    whole = 4 * figures["parameters"]  # fp32
    assert all(rank["parameters"] == rank["gradients"] == whole for rank in ddp["ranks"])
    assert sum(rank["parameters"] for rank in fsdp["ranks"]) == whole
    assert figures["step"]["fsdp_over_ddp"]["pairs"] == 2 and figures["step"]["ddp_ms"] > 0


@pytest.mark.parametrize("bad, named", [(["--workers", "4"], "--workers"), (["--workers", "1,2"], "--workers"),
                                        (["--set", "hidden=64"], "--set"), (["--rounds", "1"], "--rounds")])
def test_bench_shard_refuses_what_it_cannot_measure_in_one_line(bad, named, capsys):
    assert main(["bench", "shard", *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1
