"""The Ray runner on a real local Ray instance: it must reproduce the local runner, and a
killed peer must resume from the newest checkpoint with no step lost or trained twice."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from codistill.engine.run import train
from tests.conftest import REPO, committed_step, scaled, small_config



@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The local runner's run of a config, computed once per config."""
    runs = {}

    def get(base, *overrides):
        key = (base, overrides)
        if key not in runs:
            runs[key] = train(small_config(tmp_path_factory.mktemp("local"), "name=reference", *overrides, base=base),
                              "local")
        return runs[key]

    return get


def load_config_of(base, overrides):
    from codistill.engine.teacher import resolve_teacher

    return resolve_teacher(small_config(REPO, *overrides, base=base))


def by_step(records):
    return {(r["step"], r["peer"], r["split"]): r for r in records.to_pylist()}


def flat(final: dict) -> list[float]:
    return [final["step"], *final["peer_accuracy"], final["ensemble_accuracy"], final["churn"]]


def assert_same_run(a, b):
    rows_a, rows_b = by_step(a.records), by_step(b.records)
    assert rows_a.keys() == rows_b.keys()
    for key, row in rows_a.items():
        if key[2] == "train":
            assert rows_b[key]["loss"] == pytest.approx(row["loss"], rel=1e-5, abs=1e-6), key
        else:
            assert rows_b[key]["accuracy"] == pytest.approx(row["accuracy"], abs=1e-6), key
    assert flat(b.final) == pytest.approx(flat(a.final))


# Codistillation in lock-step (max_staleness 0) is deterministic, so it must match too.
LOCK_STEP_CODISTILL = ("method.burn_in=0", "method.period=20", "method.max_staleness=0")
# Attention transfer between peers of different widths: maps travel as named tensors of
# different shapes beside the logits (the collective transport packs them).
AT_TERM = "{name: at, source: peers, taps: [conv2, conv3]}"
# Two tiny Llama-architecture peers (Hugging Face) on the stdlib corpus, cut down to test speed.
SMALL_HF_LM = ("peers.*.model_args.config={model_type: llama, hidden_size: 32, intermediate_size: 64, "
               "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 32}",
               "data.context=32", "data.batch_size=8", "train.steps=60", "train.eval_every=20",
               "train.checkpoint_every=20")
OVERHAUL_TERM = "{name: overhaul, taps: [conv1.pre, conv2.pre, conv3.pre]}"
# A method defined in a test file, registered in every worker through `imports`.
TEST_FILE_IMPORTS, TEST_FILE_TERM = "imports=[tests.seam_method]", "{name: test_tap_agreement, tap: conv3}"


@pytest.fixture(scope="module")
def teacher_uri(ray_local, tmp_path_factory):
    """A teacher trained on the Ray runner: its checkpoints are in Ray Train's layout, which the
    student's teacher section must find as well as the local runner's."""
    folder = tmp_path_factory.mktemp("teacher")
    return train(small_config(folder, "train.steps=80", base="configs/teacher_mnist1d_wide.yaml"), "ray").storage.uri


@pytest.mark.parametrize("base,transport,overrides", [
    # One row per path through the engine (plain logits through both transports are in every row
    # below; one row per method would repeat Ray Train's start-up for the same path).
    ("configs/codistill_mnist1d.yaml", "object_store", LOCK_STEP_CODISTILL),
    # The online zoo: attention over three heterogeneous peers (keys travel beside logits);
    # ensemble slices and temporal means (the means restored by nothing but the checkpoint),
    # the latter with attention maps between peers of different widths beside the logits.
    ("configs/dml_mnist1d.yaml", "object_store", ("method={name: okddip}",
                                                  "peers=[{model: mnist1d_cnn}, {model: mnist1d_mlp}, {model: mnist1d_cnn_narrow}]",
                                                  "ray.resources_per_peer={CPU: 0.5}")),
    ("configs/dml_mnist1d.yaml", "collective", (f"method={{name: pcl, mean_decay: 0.9, also: [{AT_TERM}]}}",
                                                "peers.1.model=mnist1d_cnn_narrow")),
    # Language-model peers (Hugging Face Llama-architecture models built from a config):
    # codistillation in lock-step with top-k targets through the object store.
    ("configs/codistill_hf_stdlib.yaml", "object_store", (*LOCK_STEP_CODISTILL, *SMALL_HF_LM, "exchange.top_k=8")),
    # From a teacher: CRD (its memory banks live in the peer's network) + the overhaul (pre-ReLU
    # maps, connectors) + logit regression; between peers: CRD (features beside logits) + logit
    # regression + the overhaul's maps and margins through the exchange. (Two students, so that
    # each runner gives a peer one thread: the overhaul's sums and Adam make these runs sensitive
    # to a reduction order's last bit.)
    ("configs/kd_mnist1d.yaml", "collective", ("peers=[{model: mnist1d_cnn_narrow}, {model: mnist1d_cnn}]",
                                               f"method={{name: crd, negatives: 256, also: [{OVERHAUL_TERM}, "
                                               "{name: logit_regression, alpha: 0.5}]}")),
    # ... and a method defined in a test file beside them (registered in every worker by `imports`).
    ("configs/dml_mnist1d.yaml", "object_store", ("method={name: crd, source: peers, negatives: 64, also: ["
                                                  "{name: logit_regression, source: peers, alpha: 0.5}, "
                                                  f"{OVERHAUL_TERM[:-1]}, source: peers}}, {TEST_FILE_TERM}]}}",
                                                  TEST_FILE_IMPORTS)),
    # Factor transfer: the paraphraser trained once on the driver before the peers, then served
    # frozen beside the teacher in each Ray worker as in each local thread (two students: one
    # thread per peer in both runners).
    ("configs/kd_mnist1d.yaml", "collective", ("peers=[{model: mnist1d_cnn_narrow}, {model: mnist1d_cnn}]",
                                               "method={name: ft, student_tap: conv3, teacher_tap: conv3, "
                                               "paraphraser_steps: 20}")),
], ids=["codistill-lockstep", "okddip-3-peers", "pcl+at-between-widths", "hf-lm-codistill-top-k",
        "crd+overhaul+logit-regression", "crd+logit-regression+overhaul+test-file-method-between-peers",
        "ft"])
def test_ray_runner_reproduces_the_local_runner(ray_local, tmp_path, local_reference, teacher_uri, base, transport,
                                                overrides):
    if "kd_" in base:
        overrides = (*overrides, f"teacher.run={teacher_uri}")
        assert "/step_00000080/peer0.pt" in load_config_of(base, overrides).teacher.checkpoint
    result = train(small_config(tmp_path, "name=reference", f"exchange.transport={transport}", *overrides,
                                base=base), "ray")
    assert_same_run(local_reference(base, *overrides), result)
    nodes = {r["node"] for r in result.records.to_pylist()}
    assert len(nodes) == 1 and nodes != {"local"}  # Ray node ids, not the local runner's marker


def kill_peer0_after_a_checkpoint(run_dir, killed: dict):
    """A progress callback that kills peer 0's process once a checkpoint of its run is committed."""
    def kill(step, metrics):
        if not killed and "pid" in metrics and committed_step(run_dir) >= 100:
            killed["at"] = step
            os.kill(metrics["pid"], signal.SIGKILL)
    return kill


@pytest.mark.parametrize("base,extra", [
    ("configs/dml_mnist1d.yaml", ()),
    # Codistillation in one group (`ray.layout: one_group`, the layout before peers ran apart): a
    # killed peer restarts the whole group from one checkpoint. (Apart, only the killed peer
    # restarts: on a cluster, test_cluster.py.)
    ("configs/codistill_mnist1d.yaml", ("method.burn_in=0", "method.period=50", "method.max_staleness=0",
                                        "ray.layout=one_group")),
])
def test_a_killed_peer_restarts_from_the_newest_checkpoint_with_nothing_lost(ray_local, tmp_path, base, extra):
    overrides = ["name=killed", "train.steps=800", "train.checkpoint_every=100", "train.eval_every=200",
                 "ray.max_failures=1", *extra]
    killed = {}
    # Peers apart (codistillation) keep each peer's run in its own folder.
    kill_peer0_midway = kill_peer0_after_a_checkpoint(tmp_path / "killed", killed)

    result = train(small_config(tmp_path, *overrides, base=base), "ray", on_progress=kill_peer0_midway)
    assert killed and killed["at"] < 800, "the peer was not killed mid-run"
    for peer in (0, 1):
        steps = [r["step"] for r in result.records.to_pylist() if r["split"] == "train" and r["peer"] == peer]
        assert steps == list(range(1, 801))
    # One group: both peers restarted, from the same checkpoint.
    restarts = {r["peer"]: r["step"] - 1 for r in result.records.to_pylist() if r.get("resumed")}
    assert set(restarts) == {0, 1} and len(set(restarts.values())) == 1 and restarts[0] % 100 == 0, restarts
    # Restarting from a checkpoint changes nothing: the run equals an uninterrupted local one.
    reference = train(small_config(tmp_path, *overrides[1:], "name=uninterrupted", base=base), "local")
    assert flat(result.final) == pytest.approx(flat(reference.final))
    # Codistillation: after the restart no round from before the crash was served as new
    # (it would show as a negative staleness: a round newer than the one being trained).
    rounds = [r for r in result.records.to_pylist() if r.get("round") is not None]
    assert all(r["staleness_rounds"] == 0 for r in rounds)


def test_a_private_instance_polls_its_workers_more_often_and_leaves_the_drivers_environment_alone(ray_local):
    # Ray Train's controller reads the poll interval from the environment of the processes the
    # instance starts; the driver's own environment is as it was.
    import ray

    from codistill.engine.ray.connect import PRIVATE_INSTANCE_ENV

    @ray.remote(num_cpus=0)
    def environment():
        return {key: os.environ.get(key) for key in PRIVATE_INSTANCE_ENV}, os.nice(0)

    seen, niceness = ray.get(environment.remote())
    assert seen == PRIVATE_INSTANCE_ENV
    assert niceness == 0  # Ray's default is 15: the peers would yield to every other process
    assert all(key not in os.environ for key in PRIVATE_INSTANCE_ENV)


def test_the_group_round_board_forgets_every_round_when_a_restarted_group_joins(ray_local):
    import ray

    from codistill.exchange.round_board import GroupRoundBoard

    board = GroupRoundBoard.remote(2)
    first = ray.get([board.join.remote(0), board.join.remote(1)])
    assert first == [1, 1]
    for r in range(3):
        ray.get(board.publish.remote(1, r, 0, [ray.put(r)]))
    assert ray.get(board.newest.remote(1, 0, 0, 5, 1.0))[0] == 2
    # The workers restart and join again: a new generation with nothing published.
    assert ray.get([board.join.remote(1), board.join.remote(0)]) == [2, 2]
    assert ray.get(board.state.remote()) == {"generation": 2, "rounds": {}, "away": []}
    assert ray.get(board.newest.remote(2, 0, 0, 5, 0.2)) is None
    with pytest.raises(ray.exceptions.RayTaskError, match="generation 1"):
        ray.get(board.publish.remote(1, 3, 0, [ray.put(3)]))


def test_a_group_round_board_joins_every_replica_of_every_peer_in_one_generation(ray_local):
    # K = 2 peers of M = 2 replicas (one_group codistillation, ray.workers_per_peer: 2): both of
    # peer 0's replicas may join before peer 1's first. A join counting peers completed with the
    # first worker of each and left the last replica waiting alone in the next generation.
    import ray

    from codistill.exchange.round_board import GroupRoundBoard

    board = GroupRoundBoard.remote(2, workers_per_peer=2)
    joins = [board.join.remote(peer, replica) for peer, replica in ((0, 0), (0, 1), (1, 0), (1, 1))]  # in order
    done, waiting = ray.wait(joins, num_returns=4, timeout=scaled(30))
    assert not waiting, "a replica was left waiting for a join of its own"
    assert ray.get(done) == [1, 1, 1, 1]


def test_the_lasting_round_board_waits_once_for_an_absent_peer_and_replaces_a_returning_ones_rounds(ray_local):
    """The round board of peers that each restart alone (peers apart)."""
    import time

    import ray

    from codistill.exchange.round_board import LastingRoundBoard

    board = LastingRoundBoard.remote(2)
    assert ray.get(board.join.remote(0)) == 0  # a join never waits for the other peers
    ray.get(board.publish.remote(0, 0, 0, [{"w": 0}]))  # by value: the board owns the round
    started = time.monotonic()
    assert ray.get(board.round_trip.remote(0, 1, 0, [{"w": 1}], [1], 0, None, 1.0)) == {1: None}
    assert time.monotonic() - started >= 1.0  # peer 1 never came: waited for once...
    started = time.monotonic()
    assert ray.get(board.round_trip.remote(0, 2, 0, [{"w": 2}], [1], 1, None, 30.0)) == {1: None}
    assert time.monotonic() - started < scaled(5)  # ...and then it is away: not waited for its 30 s again
    assert ray.get(board.state.remote())["away"] == [(0, 1)]
    # Peer 1 joins late (at round 0) and may read peer 0's newer weights (no upper bound).
    answer = ray.get(board.round_trip.remote(0, 0, 1, [{"w": 10}], [0], 0, None, 1.0, 0, True))
    assert answer[0][0] == 2 and ray.get(answer[0][1][0]) == {"w": 2}
    # Once peer 1 has a usable round, peer 0 uses it again (and would wait for it again).
    found = ray.get(board.newest.remote(0, 1, 0, None, 1.0, 0))
    assert found[0] == 0 and ray.get(board.state.remote())["away"] == []
    # Peer 1 publishes rounds 1..3, crashes, restarts from round 1: its rounds 1..3 are replaced.
    for r in (1, 2, 3):
        ray.get(board.publish.remote(0, r, 1, [{"w": 10 + r}]))
    ray.get(board.publish.remote(0, 1, 1, [{"w": 21}], 0, True))
    assert ray.get(board.state.remote())["rounds"][1] == [0, 1]
    found = ray.get(board.newest.remote(0, 1, 0, None, 1.0, 0))
    assert found[0] == 1 and ray.get(found[1][0]) == {"w": 21}


def test_peers_apart_of_different_sizes_fail_apart_at_the_default_max_failures_and_a_rerun_resumes_the_killed_one(
        ray_local, tmp_path):
    """Codistillation with a 2-worker peer (DDP) beside a 1-worker peer, each its own Ray Train
    run. At `ray.max_failures: 0` (the default) Ray restarts no peer, but the peers still fail
    apart: a worker of peer 0 killed mid-run stops peer 0 alone, the other trains to its end, the
    run's error names the peer that stopped, and the same command again (longer) resumes each peer
    from its own newest checkpoint. The run is tracked (TensorBoard): across the failed call and
    the re-run it is one tracker run with every step once and the group's figures (written by the
    evaluation board) at every evaluation step the records have them. (Ray restarting a killed
    peer apart within the run, `ray.max_failures: 1`: tests/test_cluster.py, and tracked,
    tests/test_tracking_ray.py.)"""
    from codistill.errors import RunError
    from codistill.records import read_records
    from codistill.storage import RunStorage

    overrides = ["name=sizes", "train.steps=300", "train.checkpoint_every=100", "train.eval_every=100",
                 "ray.resources_per_peer={CPU: 0.5}", "peers.0.workers=2", "peers.*.optimizer.schedule=constant",
                 "method.burn_in=0", "method.period=20", "method.max_staleness=2", "method.publish=weights",
                 "method.wait_timeout_s=5", "tracking.tensorboard=true"]
    cfg = small_config(tmp_path, *overrides, base="configs/codistill_mnist1d.yaml")
    assert cfg.ray.max_failures == 0
    killed = {}
    with pytest.raises(RunError) as info:
        train(cfg, "ray", on_progress=kill_peer0_after_a_checkpoint(tmp_path / "sizes" / "peer0", killed))
    assert killed and killed["at"] < 300, "the peer was not killed mid-run"
    assert "peer 0's Ray Train run failed" in str(info.value) and "Re-run the same command" in str(info.value)
    rows = [r for r in read_records(RunStorage(str(tmp_path), "sizes")).to_pylist() if r["split"] == "train"]
    assert [r["step"] for r in rows if r["peer"] == 1] == list(range(1, 301))  # peer 1 never stopped
    saved0 = max(r["step"] for r in rows if r["peer"] == 0)
    assert saved0 % 100 == 0 and saved0 < 300
    for peer, workers in ((0, 2), (1, 1)):
        assert {r["workers"] for r in rows if r["peer"] == peer} == {workers}

    # Resume by name, longer: each peer's own Ray Train run picks up its own newest checkpoint.
    longer = train(small_config(tmp_path, *overrides, "train.steps=400", base="configs/codistill_mnist1d.yaml"), "ray")
    rows = [r for r in longer.records.to_pylist() if r["split"] == "train"]
    for peer in (0, 1):
        assert [r["step"] for r in rows if r["peer"] == peer] == list(range(1, 401))  # every step once
    assert sorted((r["peer"], r["step"] - 1) for r in rows if r.get("resumed")) == [(0, saved0), (1, 300)]
    assert {"step_00000300", "step_00000400"} <= set(os.listdir(longer.storage.path("peer0")))  # its own run
    final = longer.final
    assert final["step"] == 400 and final["ensemble_accuracy"] is not None and len(final["peer_accuracy"]) == 2
    assert "peer 0 resumed from its checkpoint" in longer.summary

    # One tracker run over both calls: every step once, and the group's figures where the records
    # have them (not at an evaluation peer 1 made while peer 0 was away: peer 0 evaluated it again
    # on the re-run's board).
    from tests.test_tracking import _scalars

    scalars = _scalars(tmp_path / "sizes" / "tensorboard")
    for peer in (0, 1):
        assert [s for s, _ in scalars[f"peer{peer}/loss"]] == list(range(1, 401))
        assert [s for s, _ in scalars[f"peer{peer}/test_accuracy"]] == [100, 200, 300, 400]
    want = {r["step"]: r["ensemble_accuracy"] for r in longer.records.to_pylist()
            if r["split"] == "test" and r["peer"] == 0 and r["ensemble_accuracy"] is not None}
    assert 100 in want and 400 in want
    assert dict(scalars["group/ensemble_accuracy"]) == pytest.approx(want)
    assert [s for s, _ in scalars["group/churn"]] == sorted(want)
    assert scalars["peer1/round_ms"]  # codistillation's rounds, where a step held one


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "codistill.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=scaled(300))


@pytest.mark.ray  # the CLI starts its own Ray instance
def test_cli_trains_on_a_local_ray_instance_and_reports(tmp_path):
    out = run_cli("train", "configs/dml_mnist1d.yaml", "--set", "name=cli", "--set", f"ray.storage_path={tmp_path}",
                  "--set", "train.steps=200", "--set", "train.eval_every=100")
    assert out.returncode == 0, out.stderr[-3000:]
    for text in ("name: cli", "peer", "ensemble", "churn", "records.parquet"):
        assert text in out.stdout
    assert (tmp_path / "cli" / "records.parquet").exists() and (tmp_path / "cli" / "accuracy.png").exists()
    report = run_cli("report", str(tmp_path / "cli"))
    assert report.returncode == 0, report.stderr
    summary = out.stdout[out.stdout.index("final evaluation"):].split("records:")[0].strip()
    assert summary in report.stdout


def test_a_diverging_ray_run_stops_with_the_peer_step_and_term_and_keeps_its_checkpoints(ray_local, tmp_path):
    from codistill.engine.checkpoint import checkpoint_folders, from_bytes
    from codistill.engine.loop import NonFiniteLoss
    from codistill.storage import RunStorage
    from tests.test_faults import DIVERGES

    with pytest.raises(NonFiniteLoss, match=r"peer \d diverged: its loss term '(ce|kl)' is nan at step \d+"):
        train(small_config(tmp_path, "name=nan", *DIVERGES), "ray")
    storage = RunStorage(str(tmp_path), "nan")
    kept = checkpoint_folders(storage, [""])
    assert kept
    state = from_bytes(storage.read_bytes(f"{kept[-1][1]}/peer0.pt"))
    assert all(t.isfinite().all() for t in state["model"].values())


def test_a_damaged_newest_ray_checkpoint_costs_no_kept_one_when_ray_prunes(ray_local, tmp_path):
    """Ray Train keeps `train.keep_checkpoints` of the checkpoints it registered and deletes the
    older ones by their folder. A run that resumes past a damaged newest checkpoint retrains its
    step: were the new checkpoint written into the damaged one's folder, Ray would later delete it
    as the old entry (and fail the run deleting it twice, and refuse the run's next start: its
    snapshot would name a folder that is gone)."""
    overrides = ["name=pruned", "train.eval_every=40", "train.checkpoint_every=40", "train.keep_checkpoints=2",
                 "peers.*.optimizer.schedule=constant"]
    train(small_config(tmp_path, *overrides, "train.steps=120"), "ray")  # keeps 80 and 120
    run = tmp_path / "pruned"
    assert sorted(p.name for p in run.glob("step_*")) == ["step_00000080", "step_00000120"]
    damaged = (run / "step_00000120" / "peer1.pt")
    damaged.write_bytes(b"not a checkpoint")

    result = train(small_config(tmp_path, *overrides, "train.steps=240"), "ray")  # from 80, past 120 to 240
    for peer in (0, 1):
        assert [r["step"] for r in result.records.to_pylist()
                if r["split"] == "train" and r["peer"] == peer] == list(range(1, 241))
    kept = sorted(p.name for p in run.glob("step_*"))
    assert len(kept) == 2 and kept[-1].startswith("step_00000240")
    for folder in kept:  # what Ray kept is whole: every peer's file loads
        for peer in (0, 1):
            torch.load(run / folder / f"peer{peer}.pt", weights_only=True)
    assert any((p / "peer1.pt").read_bytes() == b"not a checkpoint" for p in (run / "set_aside").iterdir())
    # Ray's own record of its checkpoints still matches the folders (a run whose record names a
    # missing folder does not start): a longer run resumes from step 240.
    longer = train(small_config(tmp_path, *overrides, "train.steps=280"), "ray")
    assert [r["step"] - 1 for r in longer.records.to_pylist() if r.get("resumed")][-1] == 240
