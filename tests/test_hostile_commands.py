"""Bad input to the commands (issue 43): each refused in one line naming what is wrong and what
is allowed (exit 2), before anything is written — `export --to`, `compare --target` and
`data_parallel:` settings, duplicate YAML keys, an unbounded generated data set, `report` on a
folder that has no records or is not a run, `bench kl` sizes, and a second driver of a sweep."""

from __future__ import annotations

import json

import pytest

from codistill.cli import main
from codistill.errors import ConfigError
from tests.conftest import REPO, small_config
from tests.test_hostile_inputs import _last_err_line


# -- 9: export --to a path that cannot be a folder --------------------------------------------

@pytest.mark.parametrize("where", ["under_a_file", "onto_a_file", "unwritable"])
def test_export_to_a_path_that_cannot_be_a_folder_is_one_line(tmp_path, capsys, where):
    run = tmp_path / "lm"
    run.mkdir()
    (run / "config.yaml").write_text("name: lm\npeers:\n- model: hf_causal_lm\n")
    (tmp_path / "afile").write_text("not a folder")
    to = {"under_a_file": tmp_path / "afile" / "model", "onto_a_file": tmp_path / "afile",
          "unwritable": "/sys/codistill-export-test"}[where]  # /sys refuses even root
    assert main(["export", str(run), "--to", str(to)]) == 2
    last = _last_err_line(capsys)
    assert last.startswith(f"config error: --to: {to} ") and "nothing was written" in last, last
    assert {"under_a_file": "afile is a file", "onto_a_file": "is a file, not a folder",
            "unwritable": "Operation not permitted"}[where] in last, last
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_export_of_a_model_without_an_export_capability_names_the_models_that_have_one(tmp_path, capsys):
    """Whether a model exports is its registry entry's (`ModelEntry.export`), not a name compared."""
    from codistill.models import MODELS, register_model

    run = tmp_path / "cnn"
    run.mkdir()
    (run / "config.yaml").write_text("name: cnn\npeers:\n- model: mnist1d_cnn\n")
    assert main(["export", str(run), "--to", str(tmp_path / "out")]) == 2
    last = _last_err_line(capsys)
    assert "peer 0 is model 'mnist1d_cnn', which has no folder to export" in last and "hf_causal_lm" in last, last
    assert not (tmp_path / "out").exists()

    @register_model("exports_for_a_test", input_kind="sequence", export=lambda network, folder: None)
    def exports_for_a_test(num_classes):
        raise AssertionError("not built: the refusal comes first")

    (run / "config.yaml").write_text("name: cnn\npeers:\n- model: exports_for_a_test\n")
    assert main(["export", str(run), "--to", str(tmp_path / "out")]) == 2  # passes the model check ...
    assert "no checkpoint" in _last_err_line(capsys)  # ... and stops at the checkpoints it lacks
    assert MODELS["exports_for_a_test"].export is not None


# -- 10, 11: compare's data_parallel settings and --target ------------------------------------

@pytest.mark.parametrize("setting", ["method.temperature=3", "method.bogus=1", "exchange.top_k=8", "teacher.run=x"])
def test_data_parallel_refuses_a_setting_it_cannot_use_naming_what_it_takes(setting):
    from codistill.experiments.cells import parse_method

    with pytest.raises(ConfigError) as info:
        parse_method(f"data_parallel:{setting}")
    assert info.value.path == "--methods" and repr(setting.split("=")[0]) in info.value.message, info.value
    assert "train., data., peers., ray." in info.value.message and "\n" not in str(info.value)
    assert parse_method("data_parallel:train.label_smoothing=0.1").settings == {"train.label_smoothing": 0.1}


@pytest.mark.parametrize("target", ["150", "-1", "0", "nan", "inf"])
def test_compare_target_outside_the_accuracy_range_is_one_line_before_anything_runs(tmp_path, capsys, target):
    code = main(["compare", f"{REPO}/configs/compare_mnist1d.yaml", "--methods", "independent", "--seeds", "0",
                 "--target", target, "--set", f"ray.storage_path={tmp_path}"])
    last = _last_err_line(capsys)
    assert code == 2 and last.startswith("config error: --target: got ") and "(0, 1]" in last, last
    assert not list(tmp_path.iterdir())  # nothing ran


def test_a_bits_per_token_target_is_any_finite_number_above_0():
    from codistill.experiments.compare import check_target

    check_target(2.5, "hf_text")  # bits per token: above 1 is fine
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="bits per token, a finite number above 0"):
            check_target(bad, "hf_text")


# -- 13, 14: an unbounded generated data set; duplicate YAML keys -----------------------------

def test_a_generated_data_set_is_bounded_and_the_refusal_says_the_memory_it_would_take():
    with pytest.raises(ConfigError) as info:
        small_config("/tmp", "data.train_examples=1000000000000")
    assert info.value.path == "data.train_examples" and "at most 10,000,000" in info.value.message, info.value
    assert "160,002 GB" in info.value.message  # 160 bytes kept each, and one chunk of a million made at a time
    with pytest.raises(ConfigError, match="at most 10,000,000"):
        small_config("/tmp", "data.test_examples=10000001")


@pytest.mark.parametrize("text,key,line", [
    ("name: x\ntrain:\n  steps: 20\npeers: [{model: mnist1d_mlp}]\ntrain:\n  eval_every: 10\n", "train", 5),
    ("name: x\ntrain:\n  steps: 20\n  steps: 40\n", "steps", 4),
])
def test_a_key_given_twice_in_a_config_file_is_one_line_naming_it_and_its_lines(tmp_path, capsys, text, key, line):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    assert main(["train", str(path), "--backend", "local"]) == 2
    last = _last_err_line(capsys)
    assert last.startswith(f"config error: config file {str(path)!r} is not valid YAML: duplicate key {key!r}"), last
    assert f"at line {line}," in last and "first given at line" in last


def test_duplicate_keys_are_refused_in_set_values_and_stored_configs_and_merges_still_work(tmp_path, capsys):
    from codistill.config import load_yaml

    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        small_config(tmp_path, "peers.0.optimizer={lr: 0.1, lr: 0.2}")
    assert load_yaml("base: &b {lr: 1}\npeer:\n  <<: *b\n  lr: 2\n") == {"base": {"lr": 1}, "peer": {"lr": 2}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("name: run\npeers: []\nname: other\n")
    assert main(["report", str(tmp_path / "run")]) == 2
    assert "duplicate key 'name'" in _last_err_line(capsys)


# -- 15, 16: report on a folder with no records, or a comparison's or a sweep's; bench kl sizes -

def test_report_on_a_run_with_no_records_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text("name: empty\npeers:\n- model: mnist1d_mlp\n")
    assert main(["report", str(tmp_path / "empty")]) == 2
    last = _last_err_line(capsys)
    assert last.startswith("error: ") and "has no records yet" in last, last


@pytest.mark.parametrize("kind,file,pointed", [("comparison", "compare.md", "compare.md"),
                                               ("sweep", "trials.parquet", "trials.parquet")])
def test_report_on_a_comparison_or_a_sweep_points_at_its_table(tmp_path, capsys, kind, file, pointed):
    (tmp_path / kind).mkdir()
    (tmp_path / kind / file).write_text("")
    with pytest.raises(SystemExit) as stop:
        main(["report", str(tmp_path / kind)])
    assert "not a codistill run" in str(stop.value) and f"it is a {kind}" in str(stop.value)
    assert f"{tmp_path / kind}/{pointed}" in str(stop.value)


@pytest.mark.parametrize("flag,value", [("--vocab", "0"), ("--vocab", "64"), ("--rows", "-5"), ("--rounds", "0")])
def test_bench_kl_sizes_it_cannot_measure_are_one_line(capsys, flag, value):
    assert main(["bench", "kl", flag, value]) == 2
    last = _last_err_line(capsys)
    assert last.startswith(f"config error: {flag}: ") and f"got {value}" in last, last


@pytest.mark.parametrize("which,flag,value", [("dml", "--block", "0"), ("dml", "--rounds", "0"),
                                              ("step", "--block", "-1"), ("tracking", "--rounds", "0")])
def test_a_bench_block_or_rounds_below_one_is_one_line_not_a_default(capsys, which, flag, value):
    # `--block 0` once ran the whole benchmark at its default block (an `or` took 0 for "not given").
    assert main(["bench", which, flag, value]) == 2
    last = _last_err_line(capsys)
    assert last.startswith(f"config error: {flag}: ") and f"got {value}" in last, last


# -- 12: one driver per sweep name ------------------------------------------------------------

def test_a_second_driver_of_a_sweep_is_refused_in_one_line_before_ray_starts(tmp_path, capsys):
    from codistill.lease import RunLease, RunLocked
    from codistill.experiments.tune import run_sweep
    from codistill.storage import RunStorage

    config = f"{REPO}/configs/tune_dml_mnist1d.yaml"
    cfg = small_config(tmp_path, base="configs/tune_dml_mnist1d.yaml")
    first = RunLease(RunStorage(str(tmp_path), cfg.name)).acquire()  # the first driver, still running
    try:
        assert main(["tune", config, "--set", f"ray.storage_path={tmp_path}"]) == 1
        last = _last_err_line(capsys)
        assert last.startswith(f"error: run {tmp_path}/{cfg.name} is being written by another process"), last
        with pytest.raises(RunLocked):  # run_sweep takes the lease itself (compare's tuning calls it)
            run_sweep(cfg)
    finally:
        first.release()
    assert sorted(p.name for p in (tmp_path / cfg.name).iterdir()) == []  # nothing written by the second


def test_a_resume_retries_the_trials_refused_only_by_another_drivers_lease(tmp_path):
    from codistill.experiments.sweep_lease import retry_lease_refusals
    from codistill.storage import RunStorage

    sweep = tmp_path / "sweep"
    trials = {"a_00000": ("TERMINATED", None), "a_00001": ("ERROR", "codistill.lease.RunLocked: run "
                                                                       "/x/runs/a_00001 is being written by another "
                                                                       "process (host h, pid 1)"),
              "a_00002": ("ERROR", "RuntimeError: diverged")}
    data = []
    for trial_id, (status, error) in trials.items():
        (sweep / trial_id).mkdir(parents=True)
        if error:
            (sweep / trial_id / "error.txt").write_text(f"Traceback (most recent call last):\n  ...\n{error}\n")
        data.append([json.dumps({"trial_id": trial_id, "status": status, "relative_logdir": trial_id}),
                     json.dumps({"error_filename": "error.txt" if error else None, "pickled_error_filename": None})])
    (sweep / "experiment_state-2026.json").write_text(json.dumps({"trial_data": data, "runner_data": {}}))
    assert retry_lease_refusals(RunStorage(str(tmp_path), "sweep")) == ["a_00001"]
    state = json.loads((sweep / "experiment_state-2026.json").read_text())
    statuses = {json.loads(t)["trial_id"]: (json.loads(t)["status"], json.loads(m)["error_filename"])
                for t, m in state["trial_data"]}
    # Retried under its own id (its run resumes); a real failure stays as it ended.
    assert statuses == {"a_00000": ("TERMINATED", None), "a_00001": ("PENDING", None),
                        "a_00002": ("ERROR", "error.txt")}
