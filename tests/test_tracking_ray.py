"""Tracking on Ray: peers apart — each peer its own Ray Train run, one of them killed and
restarted alone by Ray within the run — are still one tracker run, every step sent once, with the
group's figures (written by the evaluation board) at every evaluation step; a tune sweep is one
parent with a child per trial; a run that fails ends its tracker run FAILED. (Killed at
`ray.max_failures: 0` and resumed by a re-run of the name: tests/test_ray_runner.py's peers-apart
test, tracked to TensorBoard; to MLflow, killed and resumed on the local runner:
tests/test_tracking.py.)"""

from __future__ import annotations

import json

import pytest

from codistill.engine.run import train
from tests.conftest import small_config
from tests.test_ray_runner import kill_peer0_after_a_checkpoint
from tests.test_tracking import _only_run, _scalars, _steps


@pytest.mark.slow
def test_tracking_a_ray_run_that_fails_ends_its_tracker_run_failed_with_the_steps_up_to_its_checkpoint(
        ray_local, mlflow_server, tmp_path):
    """A Ray run that stops with an error (here: it diverges) closes its MLflow run FAILED, not
    FINISHED, having sent every step once from step 1 up to what its checkpoints hold."""
    from codistill.engine.loop import NonFiniteLoss
    from tests.test_faults import DIVERGES

    with pytest.raises(NonFiniteLoss):
        train(small_config(tmp_path, "name=failed", *DIVERGES, f"tracking.mlflow.tracking_uri={mlflow_server}",
                           "tracking.mlflow.experiment=failed"), "ray")
    client, run = _only_run(mlflow_server, "failed")
    assert run.info.status == "FAILED"
    stopped = _steps(client, run.info.run_id, "peer0/loss")
    assert stopped == list(range(1, len(stopped) + 1)) and 0 < len(stopped) < 400


@pytest.mark.slow
def test_tracking_a_tune_sweep_is_one_parent_with_a_child_per_trial_and_a_rerun_logs_nothing_new(
        ray_local, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from codistill.experiments.tune import run_sweep
    from tests.test_tune import sweep_config

    cfg = sweep_config(tmp_path, "tune.num_samples=2", "tune.scheduler=fifo", "tune.backend=local",
                       f"tracking.mlflow.tracking_uri={mlflow_server}", "tracking.mlflow.experiment=swept")
    rows = {r["trial_id"]: r for r in run_sweep(cfg).table.to_pylist()}
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("swept").experiment_id

    def family():
        runs = client.search_runs([experiment])
        parents = [r for r in runs if r.data.tags.get("codistill.tune") == cfg.name and "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1, [r.info.run_name for r in parents]
        return parents[0], {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}

    parent, children = family()
    assert set(children) == set(rows) and parent.info.status == "FINISHED"
    for trial, child in children.items():
        assert child.data.params["method.temperature"] == str(rows[trial]["param:method.temperature"])
        assert child.data.metrics["objective"] == pytest.approx(rows[trial]["objective"])
    assert parent.data.metrics["best_objective"] == pytest.approx(max(r["objective"] for r in rows.values()))
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"trials.parquet", "best.yaml"}
    run_sweep(cfg)  # the finished sweep again: nothing is logged twice
    again, children_again = family()
    assert again.info.run_id == parent.info.run_id
    assert {n: r.info.run_id for n, r in children_again.items()} == {n: r.info.run_id for n, r in children.items()}
    assert len(client.get_metric_history(parent.info.run_id, "best_objective")) == 1


@pytest.mark.slow
def test_tracking_a_peer_restarted_alone_by_ray_in_the_run_is_one_tracker_run_with_every_step_once(
        ray_local, mlflow_server, tmp_path):
    """Peers apart at `ray.max_failures: 1`: peer 0's worker killed after a checkpoint, Ray Train
    restarts peer 0's run alone while peer 1 goes on, within the one `train` call. The driver's
    writer is not in either worker, so no second tracker run opens, and the steps peer 0 retrains
    after its checkpoint are not sent twice."""
    overrides = ["name=restarted", "train.steps=300", "train.checkpoint_every=100", "train.eval_every=100",
                 "ray.resources_per_peer={CPU: 1}", "ray.max_failures=1", "peers.*.optimizer.schedule=constant",
                 "method.burn_in=0", "method.period=20", "method.max_staleness=2", "method.wait_timeout_s=5",
                 "tracking.tensorboard=true", f"tracking.mlflow.tracking_uri={mlflow_server}",
                 "tracking.mlflow.experiment=restarted"]
    cfg = small_config(tmp_path, *overrides, base="configs/codistill_mnist1d.yaml")
    assert cfg.layout == "apart"
    killed = {}
    result = train(cfg, "ray", on_progress=kill_peer0_after_a_checkpoint(tmp_path / "restarted" / "peer0", killed))
    assert killed and killed["at"] < 300, "the peer was not killed mid-run"
    rows = result.records.to_pylist()
    assert [r["peer"] for r in rows if r.get("resumed")] == [0]  # peer 0 alone restarted, in this run
    client, run = _only_run(mlflow_server, "restarted")
    assert run.info.status == "FINISHED"
    for peer in (0, 1):
        assert _steps(client, run.info.run_id, f"peer{peer}/loss") == list(range(1, 301))
        assert _steps(client, run.info.run_id, f"peer{peer}/test_accuracy") == [100, 200, 300]
    want = {r["step"]: r["ensemble_accuracy"] for r in rows
            if r["split"] == "test" and r["peer"] == 0 and r["ensemble_accuracy"] is not None}
    got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "group/ensemble_accuracy")}
    assert 300 in want and got == pytest.approx(want)
    scalars = _scalars(tmp_path / "restarted" / "tensorboard")
    assert [s for s, _ in scalars["peer0/loss"]] == list(range(1, 301))
    assert [s for s, _ in scalars["peer1/test_accuracy"]] == [100, 200, 300]
    state = json.loads((tmp_path / "restarted" / "tracking" / "state.json").read_text())
    assert state["mlflow"]["run_id"] == run.info.run_id and state["mlflow"]["sent"] == 300
