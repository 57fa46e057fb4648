"""Ray Tune sweeps on a real local Ray instance: each trial is a Ray Train run of 2 peers."""

import json

import pyarrow.parquet as pq

import pytest
import yaml

from torch import nn

from codistill import register_model
from codistill.config import load_config
from codistill.engine.run import train
from tests.conftest import REPO
from codistill.experiments.tune import BEST_FILE, PLOT_FILE, TRIALS_FILE, run_sweep


SHORT = ["train.steps=100", "train.eval_every=50", "train.checkpoint_every=100", "tune.max_concurrent=1"]


# A model the user's code registers (in this test module, as a user's own module would).
@register_model("test_tune_user_mlp", input_kind="sequence")
def user_mlp(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, num_classes))


def assert_one_trial_at_a_time(run_dir, rows):
    """`tune.max_concurrent: 1` holds (Tune ignores its own bound when given a search generator):
    each trial's reports span [start, end], and no trial starts before the one before it ended.
    (Trials on Ray Train reserve no CPU themselves, so only the bound keeps them apart.)"""
    spans = []
    for row in rows:
        reports = [json.loads(line) for line in (run_dir / row["trial_id"] / "result.json").read_text().splitlines()]
        spans.append((reports[0]["timestamp"] - reports[0]["time_this_iter_s"], reports[-1]["timestamp"]))
    spans.sort()
    assert all(later[0] >= earlier[1] - 1 for earlier, later in zip(spans, spans[1:])), spans


def sweep_config(tmp_path, *overrides):
    return load_config(f"{REPO}/configs/tune_dml_mnist1d.yaml", [f"ray.storage_path={tmp_path}", *SHORT, *overrides])


def test_a_sweep_completes_and_its_best_config_reproduces_the_best_trial(ray_local, tmp_path):
    # Trials as threads in their Tune process (`tune.backend: local`), the best config then on Ray
    # Train: the two runners reproduce each other. (Trials on Ray Train: every test below.)
    cfg = sweep_config(tmp_path, "tune.num_samples=3", "tune.scheduler=fifo", "tune.backend=local")
    result = run_sweep(cfg)
    rows = result.table.to_pylist()
    assert len(rows) == 3 and all(r["status"] == "TERMINATED" for r in rows)
    assert {r["param:method.temperature"] for r in rows}.__len__() == 3  # sampled, not repeated
    assert all(1 <= r["param:method.temperature"] <= 10 for r in rows)
    run_dir = tmp_path / cfg.name
    for name in (TRIALS_FILE, BEST_FILE, PLOT_FILE):
        assert (run_dir / name).exists()
    assert result.best_objective == max(r["objective"] for r in rows)

    best = load_config(str(run_dir / BEST_FILE))
    assert best.tune is None and best.name == f"{cfg.name}-best"
    again = train(best, "ray")
    assert again.final["ensemble_accuracy"] == pytest.approx(result.best_objective, abs=1e-6)


def test_asha_stops_a_trial_that_cannot_learn(ray_local, tmp_path):
    # Two learning rates that learn, then one that cannot: ASHA sees the first two at each rung.
    cfg = sweep_config(tmp_path, "train.steps=200", "tune.num_samples=1", "tune.scheduler=asha",
                       "tune.space={peers.*.optimizer.lr: 'grid([0.01, 0.005, 1.0e-7])'}")
    table = run_sweep(cfg).table.to_pylist()
    assert_one_trial_at_a_time(tmp_path / cfg.name, table)
    rows = {r["param:peers.*.optimizer.lr"]: r for r in table}
    assert rows[1e-7]["status"] == "STOPPED" and rows[1e-7]["last_step"] < 200
    assert rows[0.01]["status"] == "TERMINATED" and rows[0.01]["last_step"] == 200
    assert rows[0.01]["objective"] > rows[1e-7]["objective"] + 0.2


def test_a_failing_trial_is_reported_with_its_error_and_the_sweep_goes_on(ray_local, tmp_path):
    # What the config can check is checked before any trial (a batch larger than the data set is
    # refused at load); a data folder the workers cannot create fails inside one trial only. The
    # other trial trains a model the user's code registered: Tune runs each trial in a process
    # that imports codistill afresh, so the registration is shipped.
    unwritable = "/proc/codistill-cannot-create-this"
    cfg = sweep_config(tmp_path, "tune.num_samples=1", "tune.scheduler=fifo", "peers.*.model=test_tune_user_mlp",
                       f"tune.space={{data.root: 'grid([{unwritable}, ~/.cache/codistill])'}}")
    result = run_sweep(cfg)
    rows = {r["param:data.root"]: r for r in result.table.to_pylist()}
    assert rows[unwritable]["status"] == "ERROR" and "codistill-cannot-create-this" in rows[unwritable]["error"]
    assert rows["~/.cache/codistill"]["status"] == "TERMINATED" and rows["~/.cache/codistill"]["objective"] > 0.2
    best = yaml.safe_load((tmp_path / cfg.name / BEST_FILE).read_text())
    assert best["data"]["root"] == "~/.cache/codistill" and best["peers"][0]["model"] == "test_tune_user_mlp"
    assert "ERROR" in result.summary


def test_a_space_value_the_config_refuses_is_refused_before_any_trial(tmp_path):
    from codistill.config import ConfigError

    with pytest.raises(ConfigError) as info:
        sweep_config(tmp_path, "tune.space={data.batch_size: 'grid([5000, 100])'}")
    assert info.value.path == "tune.space.data.batch_size" and "4000 training examples" in info.value.message
    # Label smoothing (the regularisation baseline) is searched like any setting, and checked alike.
    assert sweep_config(tmp_path, "tune.space={train.label_smoothing: 'uniform(0.0, 0.2)'}").tune.space
    with pytest.raises(ConfigError) as info:
        sweep_config(tmp_path, "tune.space={train.label_smoothing: 'grid([0.1, 1.5])'}")
    assert info.value.path == "tune.space.train.label_smoothing" and "[0, 1)" in info.value.message




def test_a_search_starts_at_the_configs_own_values_of_the_searched_keys(tmp_path):
    from codistill.config import to_dict
    from codistill.experiments.tune import config_point

    cfg = sweep_config(tmp_path, "peers.*.optimizer.lr=0.02", "method.temperature=2.5")
    point = config_point(to_dict(cfg), cfg.tune.space)
    assert set(point) == set(cfg.tune.space)
    assert point["method.temperature"] == 2.5 and point["peers.*.optimizer.lr"] == 0.02  # `*`: peer 0's


def test_several_seeds_per_trial_need_the_fifo_scheduler(tmp_path):
    from codistill.config import ConfigError

    with pytest.raises(ConfigError) as info:
        sweep_config(tmp_path, "tune.seeds_per_trial=2", "tune.scheduler=asha")
    assert info.value.path == "tune.scheduler" and "fifo" in info.value.message
    assert sweep_config(tmp_path, "tune.seeds_per_trial=2", "tune.scheduler=fifo").tune.seeds_per_trial == 2


def sweep_command(tmp_path, steps: int, temperatures: str) -> tuple[list[str], dict]:
    """`codistill tune` of a small DML sweep (a grid over the temperature, local trials one at a
    time, a checkpoint every 50 steps) in its own process and Ray instance, and its environment."""
    import os
    import sys

    argv = [sys.executable, "-m", "codistill.cli", "tune", f"{REPO}/configs/tune_dml_mnist1d.yaml",
            "--set", f"ray.storage_path={tmp_path}", "--set", "name=sweep", "--set", f"train.steps={steps}",
            "--set", "train.eval_every=50", "--set", "train.checkpoint_every=50", "--set", "tune.backend=local",
            "--set", f"tune.space={{method.temperature: 'grid({temperatures})'}}", "--set", "tune.num_samples=1",
            "--set", "tune.scheduler=fifo", "--set", "tune.max_concurrent=1"]
    return argv, {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


@pytest.mark.ray  # the CLI starts its own Ray instance
def test_a_killed_sweep_resumes_on_rerun_keeping_its_finished_trials(tmp_path):
    """`kill -9` of the `codistill tune` driver and its whole Ray instance (as a machine that
    fails takes them all) while its second trial trains, then the same command again: the
    finished trial is not trained again, the interrupted one resumes its run, the third runs, and
    the table has the sweep's three trials (no new trial ids, no stale lease). A sweep refused
    for changed settings is refused before any Ray instance starts."""
    import signal
    import subprocess

    import psutil

    from tests.conftest import phase, scaled, wait_until

    argv, env = sweep_command(tmp_path, 100, "[1.5, 3.0, 6.0]")
    runs = tmp_path / "sweep" / "runs"
    first = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: any(runs.glob("*/records.parquet")) and len(list(runs.glob("*/checkpoints/step_*/meta.pt")))
                   > len(list(runs.glob("*/checkpoints/step_00000100/meta.pt"))),
                   "a finished trial and a checkpoint of the next", 300, alive=first, poll=0.1)
        tree = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
        for process in tree:
            process.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    psutil.wait_procs(tree, timeout=scaled(30))
    (done,) = [path.parent for path in runs.glob("*/records.parquet")]
    kept = (done / "records.parquet").stat().st_mtime_ns
    before = {path.name for path in runs.iterdir()}

    with phase("the re-run of the sweep", 300) as limit:
        again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming sweep" in again.stderr
    table = pq.read_table(tmp_path / "sweep" / TRIALS_FILE).to_pylist()
    assert len(table) == 3 and all(r["status"] == "TERMINATED" for r in table), table
    assert before <= {r["trial_id"] for r in table} == {path.name for path in runs.iterdir()}  # no new trial ids
    assert (done / "records.parquet").stat().st_mtime_ns == kept  # the finished trial was not trained again
    assert not list(runs.glob("*/lease.json")), "a stale lease was left behind"

    # A sweep begun before a setting was added to the schema (here `train.sharding`, as Ray's
    # tuner.pkl and sweep.yaml of such a sweep have it: without the key) still resumes: Ray's
    # restore takes only a space with the keys the sweep began with.
    from ray import cloudpickle  # Ray's own: the state holds the sweep's lambdas

    tuner_pkl, sweep_yaml = tmp_path / "sweep" / "tuner.pkl", tmp_path / "sweep" / "sweep.yaml"
    state = cloudpickle.loads(tuner_pkl.read_bytes())
    state["__flattened_param_space_keys"].remove("base/train/sharding")
    tuner_pkl.write_bytes(cloudpickle.dumps(state))
    sweep_yaml.write_text("".join(line for line in sweep_yaml.read_text().splitlines(keepends=True)
                                  if not line.startswith("  sharding:")))
    older = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
    assert older.returncode == 0 and "resuming sweep" in older.stderr, older.stdout[-3000:] + older.stderr[-3000:]

    changed = subprocess.run([*argv, "--set", "train.steps=200"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=limit)
    assert changed.returncode == 2 and "train.steps" in changed.stderr and "another `name`" in changed.stderr
    # Refused before any Ray instance started (a started one shows in the log, as in the re-run's).
    assert "Ray" in again.stderr and "Ray" not in changed.stderr, changed.stderr


@pytest.mark.ray  # the CLI starts its own Ray instance
def test_ctrl_c_of_a_sweep_is_an_interruption_not_a_sweep_that_finished(tmp_path):
    """SIGINT to the `codistill tune` driver while its first trial trains: the command ends
    interrupted (130) and writes no best trial — Tune's own handler would have returned from the
    sweep normally, and its best of the trials finished so far (none here, or some) would pass
    for the sweep's result, as a comparison once took it for its tuning."""
    import signal
    import subprocess

    from tests.conftest import phase, wait_until

    argv, env = sweep_command(tmp_path, 400, "[1.5, 3.0]")
    runs = tmp_path / "sweep" / "runs"
    driver = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: any(runs.glob("*/checkpoints/step_*/meta.pt")), "the first trial's first checkpoint", 300,
                   alive=driver, poll=0.1)
        driver.send_signal(signal.SIGINT)
        with phase("the interrupted sweep's exit", 120) as limit:
            output, _ = driver.communicate(timeout=limit)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, output[-3000:]
    assert "interrupted" in output and not (tmp_path / "sweep" / "best.yaml").exists(), output[-3000:]
