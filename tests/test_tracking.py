"""Runs sent to experiment trackers (`tracking:`), read back with each tracker's own reader: the
config section, TensorBoard's event reader, a real MLflow server on 127.0.0.1 with a SQLite store
(read back with MlflowClient, one run across a kill and a resume), W&B's offline run files.
No tracker is mocked: each test drives the real library."""

from __future__ import annotations

import glob
import json
import os
import signal
import struct
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from codistill.cli import main
from codistill.config import ConfigError, load_config
from codistill.storage import RunStorage
from tests.conftest import REPO, phase, scaled, wait_until

QUICK = ["--set", "train.steps=40", "--set", "train.eval_every=10", "--set", "train.checkpoint_every=20"]


def _records(run_dir) -> list[dict]:
    return pq.read_table(os.path.join(run_dir, "records.parquet")).to_pylist()


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """The same steps with the same values (TensorBoard keeps float32)."""
    return [s for s, _ in got] == [s for s, _ in want] and [v for _, v in got] == pytest.approx([v for _, v in want])


def _test_accuracy(run_dir, peer: int) -> list[tuple[int, float]]:
    return [(r["step"], r["accuracy"]) for r in _records(run_dir) if r["split"] == "test" and r["peer"] == peer]


# -- the section ---------------------------------------------------------------------------------

def test_tracking_is_off_by_default_and_set_from_the_command_line():
    cfg = load_config(f"{REPO}/configs/dml_mnist1d.yaml")
    assert cfg.tracking.trackers == []
    cfg = load_config(f"{REPO}/configs/dml_mnist1d.yaml", ["tracking.tensorboard=true", "tracking.mlflow=true",
                                                           "tracking.wandb.mode=offline"])
    assert cfg.tracking.trackers == ["tensorboard", "mlflow", "wandb"]
    assert cfg.tracking.mlflow.experiment == "codistill" and cfg.tracking.wandb.mode == "offline"


@pytest.mark.parametrize("setting,said", [
    ("tracking.neptune=true", "tracking.neptune: unknown key; allowed keys here: mlflow, tensorboard, wandb"),
    ("tracking.wandb.mode=cloud", "tracking.wandb.mode: got 'cloud'; allowed: 'online', 'offline'"),
    ("tracking.mlflow.experment=x", "tracking.mlflow.experment: unknown key; allowed keys here: experiment, tracking_uri"),
])
def test_tracking_refuses_a_wrong_key_or_an_unknown_tracker_in_one_line_with_exit_2(setting, said, capsys):
    assert main(["train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local", "--set", setting]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"config error: {said}"]


@pytest.mark.parametrize("tracker,module,package", [("mlflow", "mlflow", "mlflow-skinny"), ("wandb", "wandb", "wandb"),
                                                     ("tensorboard", "tensorboard", "tensorboard")])
def test_tracking_names_the_extra_when_a_trackers_package_is_missing(tracker, module, package, monkeypatch, tmp_path):
    from codistill.tracking import RunTracker

    cfg = load_config(f"{REPO}/configs/dml_mnist1d.yaml", [f"tracking.{tracker}=true", f"ray.storage_path={tmp_path}"])
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: `import` raises ImportError
    with pytest.raises(ConfigError) as refused:
        RunTracker.open(cfg, RunStorage(str(tmp_path), cfg.name))
    assert str(refused.value) == (f"tracking.{tracker}: is on, but the {package} package is not installed: "
                                  f"pip install 'codistill[track]' (or pip install {package})")


@pytest.mark.slow
def test_tracking_writer_runs_in_a_process_of_its_own_at_the_lowest_cpu_priority(tmp_path):
    """The run's steps share no GIL and no CPU priority with its tracker writer (docs/benchmarks.md:
    a writer thread cost 5 ms steps 1.7×): the writer is another process, niced to 19 in Linux's
    idle class, and it is that process that writes the tracker's files."""
    from codistill.tracking import RunTracker

    cfg = load_config(f"{REPO}/configs/dml_mnist1d.yaml", ["tracking.tensorboard=true", f"ray.storage_path={tmp_path}"])
    with RunTracker.open(cfg, RunStorage(str(tmp_path), cfg.name)) as tracker:
        writer = tracker.process.pid
        assert writer != os.getpid() and os.getpriority(os.PRIO_PROCESS, writer) == 19
        assert os.sched_getscheduler(writer) == os.SCHED_IDLE  # preempted at once by a peer that wakes
        tracker.close("FINISHED")
    [events] = glob.glob(str(tmp_path / cfg.name / "tensorboard" / "events.out.tfevents.*"))
    assert events.rsplit(".", 2)[1] == str(writer)  # TensorBoard names its file after the writing process


# -- TensorBoard -----------------------------------------------------------------------------------

def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_tracking_tensorboard_from_the_command_line_has_each_peers_test_accuracy_at_every_evaluation(tmp_path):
    assert main(["train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local", "--set", "tracking.tensorboard=true",
                 "--set", f"ray.storage_path={tmp_path}", *QUICK]) == 0
    run = tmp_path / "dml_mnist1d"
    scalars = _scalars(run / "tensorboard")
    for peer in (0, 1):
        want = _test_accuracy(run, peer)
        assert [s for s, _ in want] == [10, 20, 30, 40]
        assert _same(scalars[f"peer{peer}/test_accuracy"], want)
        assert [s for s, _ in scalars[f"peer{peer}/loss"]] == list(range(1, 41))
        assert {f"peer{peer}/kl", f"peer{peer}/lr", f"peer{peer}/step_ms", f"peer{peer}/peak_memory_mb"} <= set(scalars)
    ensemble = [(r["step"], r["ensemble_accuracy"]) for r in _records(run) if r["split"] == "test" and r["peer"] == 0]
    assert _same(scalars["group/ensemble_accuracy"], ensemble)
    assert [s for s, _ in scalars["group/churn"]] == [10, 20, 30, 40]


def test_tracking_backfill_sends_a_finished_runs_records_once(tmp_path, capsys):
    assert main(["train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local", "--set", f"ray.storage_path={tmp_path}",
                 *QUICK]) == 0
    run = tmp_path / "dml_mnist1d"
    assert not (run / "tensorboard").exists()
    assert main(["track", str(run), "--to", "tensorboard"]) == 0
    assert capsys.readouterr().out.strip().endswith("→ tensorboard: steps 1..40")
    assert main(["track", str(run), "--to", "tensorboard"]) == 0  # again: nothing twice
    assert capsys.readouterr().out.strip().endswith("→ tensorboard: nothing new (it holds step 40)")
    scalars = _scalars(run / "tensorboard")
    assert [s for s, _ in scalars["peer0/loss"]] == list(range(1, 41))
    assert _same(scalars["peer1/test_accuracy"], _test_accuracy(run, 1))
    assert main(["track", str(tmp_path), "--to", "tensorboard"]) == 2  # not a run: one line
    assert capsys.readouterr().err.strip().splitlines() == [f"config error: {tmp_path} is not a codistill run "
                                                             "(no config.yaml)"]


def test_tracking_turned_on_when_a_finished_run_is_run_again_sends_its_records_and_trains_nothing(tmp_path):
    args = ["train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local", "--set", f"ray.storage_path={tmp_path}",
            *QUICK]
    assert main(args) == 0
    before = _records(tmp_path / "dml_mnist1d")
    assert main([*args, "--set", "tracking.tensorboard=true"]) == 0  # `tracking` may change on a resume
    assert _records(tmp_path / "dml_mnist1d") == before  # nothing trained again
    scalars = _scalars(tmp_path / "dml_mnist1d" / "tensorboard")
    assert [s for s, _ in scalars["peer1/loss"]] == list(range(1, 41))


# -- MLflow: a real server -------------------------------------------------------------------------

def _only_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_tracking_mlflow_server_holds_the_metrics_at_their_steps_the_params_and_the_artifacts(mlflow_server, tmp_path):
    assert main(["train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local", "--set", f"ray.storage_path={tmp_path}",
                 "--set", f"tracking.mlflow.tracking_uri={mlflow_server}", "--set", "tracking.mlflow.experiment=one",
                 *QUICK]) == 0
    client, run = _only_run(mlflow_server, "one")
    assert run.info.status == "FINISHED" and run.info.run_name == "dml_mnist1d"
    run_dir = tmp_path / "dml_mnist1d"
    for peer in (0, 1):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"peer{peer}/test_accuracy"))
        assert _same(history, _test_accuracy(run_dir, peer))
    assert _steps(client, run.info.run_id, "peer1/loss") == list(range(1, 41))
    params = run.data.params
    assert params["method.temperature"] == "3.0" and params["peers.1.optimizer.lr"] == "0.01"
    assert params["train.steps"] == "40" and params["peers.0.model"] == "mnist1d_cnn"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "accuracy.png", "summary.txt"}
    summary = open(client.download_artifacts(run.info.run_id, "summary.txt", str(tmp_path))).read()
    assert "final evaluation at step 40" in summary
    state = json.loads((run_dir / "tracking" / "state.json").read_text())
    assert state["mlflow"]["run_id"] == run.info.run_id and state["mlflow"]["sent"] == 40
    assert not any(tag.startswith("codistill.export") for tag in run.data.tags)  # a CNN has nothing to export


@pytest.mark.slow
def test_tracking_a_language_model_peer_sends_where_codistill_export_writes_it_from(mlflow_server, tmp_path):
    """hf_causal_lm peers: at the run's end each peer's newest checkpoint file, its step and the
    `codistill export` command are the MLflow run's tags; the command, run, exports that step."""
    from codistill.engine.run import train
    from tests.test_hf import documents, hf_config

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"body": text}) + "\n" for text in documents(120)))
    cfg = load_config({**hf_config(tmp_path, corpus), "tracking": {"mlflow": {"tracking_uri": mlflow_server,
                                                                              "experiment": "exported"}}})
    result = train(cfg, "local")
    client, run = _only_run(mlflow_server, "exported")
    assert _steps(client, run.info.run_id, "peer1/test_bits") == [2, 4]  # a language model's score: bits per token
    tags = run.data.tags
    for peer in (0, 1):
        path = tags[f"codistill.export.peer{peer}"]
        assert path == f"{result.storage.uri}/checkpoints/step_00000004/peer{peer}.pt" and os.path.exists(path)
        assert tags[f"codistill.export.peer{peer}.step"] == "4"
        command = tags[f"codistill.export.peer{peer}.command"].split()
        assert command[:2] == ["codistill", "export"] and command[-1] == "DIR"
        assert main([*command[1:-1], str(tmp_path / f"out{peer}")]) == 0
        assert "- step: 4" in (tmp_path / f"out{peer}" / "README.md").read_text()


@pytest.mark.slow
def test_tracking_a_killed_and_resumed_run_is_one_mlflow_run_with_no_step_logged_twice(mlflow_server, tmp_path):
    """Killed (SIGKILL) inside its training, its MLflow run open (the writer, at the lowest priority,
    may have sent nothing yet) and a checkpoint in, then re-run under its name: one MLflow run,
    every step once; TensorBoard's reader sees every step once too."""
    steps = 300
    args = [sys.executable, "-m", "codistill.cli", "train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local",
            "--set", f"ray.storage_path={tmp_path}", "--set", f"train.steps={steps}", "--set", "train.eval_every=20",
            "--set", "train.checkpoint_every=20", "--set", f"tracking.mlflow.tracking_uri={mlflow_server}",
            "--set", "tracking.mlflow.experiment=resumed", "--set", "tracking.tensorboard=true"]
    env = {**os.environ, "PYTHONPATH": REPO}
    run_dir = tmp_path / "dml_mnist1d"

    def trained() -> int:  # the newest committed checkpoint's step
        return max([int(p.parent.name[5:]) for p in run_dir.glob("checkpoints/step_*/meta.pt")], default=0)

    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: trained() >= 40, "a checkpoint at step 40", 240, alive=first)  # opened before step 1
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=scaled(30))
    finally:
        first.kill()
    assert 40 <= trained() < steps, "the kill must land inside the training"
    assert json.loads((run_dir / "tracking" / "state.json").read_text())["mlflow"]["run_id"]
    with phase("the resumed run", 300) as limit:
        resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=limit)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, run = _only_run(mlflow_server, "resumed")
    assert run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id, "peer0/loss") == list(range(1, steps + 1))
    assert _steps(client, run.info.run_id, "peer1/test_accuracy") == list(range(20, steps + 1, 20))
    scalars = _scalars(tmp_path / "dml_mnist1d" / "tensorboard")
    assert [s for s, _ in scalars["peer0/loss"]] == list(range(1, steps + 1))
    assert [s for s, _ in scalars["peer1/test_accuracy"]] == list(range(20, steps + 1, 20))


@pytest.mark.slow
def test_tracking_steps_a_tracker_holds_beyond_the_state_file_are_not_sent_twice(mlflow_server, tmp_path):
    """A writer that died after sending but before writing its state file: on the resume, MLflow
    is asked for the last step it holds, and TensorBoard's new event file purges from the first
    step not recorded as sent — so neither shows a step twice."""
    args = ["train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local", "--set", f"ray.storage_path={tmp_path}",
            "--set", "peers.*.optimizer.schedule=constant", "--set", "tracking.tensorboard=true",
            "--set", f"tracking.mlflow.tracking_uri={mlflow_server}", "--set", "tracking.mlflow.experiment=behind", *QUICK]
    assert main(args) == 0
    state_file = tmp_path / "dml_mnist1d" / "tracking" / "state.json"
    state = json.loads(state_file.read_text())
    for tracker in ("mlflow", "tensorboard"):
        state[tracker]["sent"] = 20  # as if steps 21..40 were sent and the state file not written after
    state_file.write_text(json.dumps(state))
    assert main([*args, "--set", "train.steps=60"]) == 0  # resumes from step 40 to 60
    client, run = _only_run(mlflow_server, "behind")
    assert _steps(client, run.info.run_id, "peer0/loss") == list(range(1, 61))
    assert _steps(client, run.info.run_id, "peer1/test_accuracy") == [10, 20, 30, 40, 50, 60]
    scalars = _scalars(tmp_path / "dml_mnist1d" / "tensorboard")
    assert [s for s, _ in scalars["peer0/loss"]] == list(range(1, 61))
    assert _same(scalars["peer1/test_accuracy"], _test_accuracy(tmp_path / "dml_mnist1d", 1))


# -- W&B: offline, read back from its run files ----------------------------------------------------

def wandb_records(path: str):
    """The records of a W&B run file (`run-<id>.wandb`): W&B's LevelDB-style log — a 7-byte header
    (":W&B", 0xBEE1, version 0), then 32 KiB blocks of chunks (crc32, length, type: 1 full, 2
    first, 3 middle, 4 last) — each record a `wandb_internal_pb2.Record` (W&B's own protobuf)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:
            break
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.slow
def test_tracking_wandb_offline_writes_every_step_the_config_and_the_summary(tmp_path):
    assert main(["train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local", "--set", f"ray.storage_path={tmp_path}",
                 "--set", "tracking.wandb.mode=offline", "--set", "tracking.wandb.project=offline-test", *QUICK]) == 0
    run_dir = tmp_path / "dml_mnist1d"
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    # W&B's service writes the file after `finish` returns (in a process that lives on, as here): the
    # file is whole once it holds the exit record (read before it, the last step was seen missing).
    def whole() -> bool:
        try:
            return any(r.WhichOneof("record_type") == "exit" for r in wandb_records(files[0]))
        except Exception:  # noqa: BLE001 — a record half written yet
            return False

    wait_until(whole, "W&B writing the run file's exit record", 30)
    history, config, run_ids = {}, {}, set()
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            # W&B keeps a key with a slash as its parts (`nested_key`), a plain key as `key`.
            history[record.history.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                                for i in record.history.item}
        elif kind == "config":
            config.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.config.update})
        elif kind == "run":
            run_ids.add(record.run.run_id)
    state = json.loads((run_dir / "tracking" / "state.json").read_text())
    assert run_ids == {state["wandb"]["id"]}
    assert sorted(history) == list(range(1, 41))
    for peer in (0, 1):
        assert _same([(s, history[s][f"peer{peer}/test_accuracy"]) for s in (10, 20, 30, 40)], _test_accuracy(run_dir, peer))
    assert config["method.temperature"] == "3.0" and config["peers.0.model"] == "mnist1d_cnn"
    summary = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files" / "summary.txt"))
    assert summary and "final evaluation at step 40" in open(summary[0]).read()


# -- a comparison: one parent, a child per cell ----------------------------------------------------

@pytest.mark.slow
def test_tracking_a_comparison_is_one_parent_with_a_child_per_cell_and_a_rerun_logs_nothing_new(mlflow_server, tmp_path):
    from codistill.experiments.compare import compare
    from tests.test_compare import tiny

    cfg = tiny(tmp_path, f"tracking.mlflow.tracking_uri={mlflow_server}", "tracking.mlflow.experiment=compared",
               "tracking.tensorboard=true")
    table = compare(cfg, ["independent", "dml"], [0, 1], log=lambda line: None, target=0.2).table.to_pylist()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("compared").experiment_id

    def runs() -> dict:
        return {r.info.run_name: r for r in client.search_runs([experiment])}

    first = runs()
    cells = {f"{cfg.name}.{method}.seed{seed}": (method, seed) for method in ("independent", "dml") for seed in (0, 1)}
    assert set(first) == {cfg.name, *cells}
    parent = first[cfg.name]
    assert "mlflow.parentRunId" not in parent.data.tags and parent.info.status == "FINISHED"
    for name, (method, seed) in cells.items():
        child = first[name]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.info.status == "FINISHED"
        assert child.data.params["method.name"] == method and child.data.params["seed"] == str(seed)
        assert _steps(client, child.info.run_id, "peer0/loss") == list(range(1, 61))
        scalars = _scalars(tmp_path / cfg.name / "tensorboard" / name)  # TensorBoard: a folder per child
        assert [s for s, _ in scalars["peer1/test_accuracy"]] == [30, 60]
    assert {"dml/diff_mean", "dml/diff_mean_low", "dml/diff_mean_high", "dml/diff_wins_mean"} <= set(parent.data.metrics)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"compare.md", "compare.png"}
    reached = {m: [r["target_step"] for r in table if r["method"] == m and r["target_step"]] for m in ("independent", "dml")}
    assert parent.data.metrics["target"] == 0.2 and reached["dml"] and reached["independent"]
    for method, steps in reached.items():  # steps to the target: the parent's metrics too
        assert parent.data.metrics[f"{method}/target_reached"] == len(steps)
        assert parent.data.metrics[f"{method}/target_steps"] == pytest.approx(sum(steps) / len(steps))
    assert "dml/target_steps_diff" in parent.data.metrics
    assert _scalars(tmp_path / cfg.name / "tensorboard")["dml/diff_mean"][0][0] == 0
    logged = {(name, key): len(client.get_metric_history(run.info.run_id, key))
              for name, run in first.items() for key in run.data.metrics}
    compare(cfg, ["independent", "dml"], [0, 1], log=lambda line: None, target=0.2)  # every cell from the cache
    second = runs()
    assert {n: r.info.run_id for n, r in second.items()} == {n: r.info.run_id for n, r in first.items()}
    assert {(name, key): len(client.get_metric_history(run.info.run_id, key))
            for name, run in second.items() for key in run.data.metrics} == logged
    assert second[cfg.name].info.status == "FINISHED"


# -- what tracking costs: `codistill bench tracking` -----------------------------------------------

@pytest.mark.slow
def test_tracking_bench_runs_every_tracker_on_and_off_and_reports_the_ratio_with_its_interval(
        mlflow_server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "tracking", "--rounds", "1", "--block", "20", "--set", "train.eval_every=10",
                 "--set", f"tracking.mlflow.tracking_uri={mlflow_server}", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    ratio = figures["step_time_on_over_off"]
    assert ratio["pairs"] == 1 and ratio["low"] <= ratio["ratio"] <= ratio["high"]
    assert len(figures["arms"]["on"]["step_ms"]) == len(figures["arms"]["off"]["step_ms"]) == 1
    assert "step time, every tracker on ÷ off [95% CI]:" in capsys.readouterr().out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("codistill-bench").experiment_id])}
    assert set(runs) == {"warmup_on", "round0_on"}  # the tracked arm sent to MLflow, the other did not
    assert _steps(client, runs["round0_on"].info.run_id, "peer1/loss") == list(range(1, 21))
