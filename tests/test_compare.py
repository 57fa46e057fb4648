"""`codistill compare`: a finished cell is never rerun, the table is the runs' records, every
method gets the same tuning budget on a validation split the test set never enters."""

import json
import os

import pyarrow.parquet as pq
import pytest
import torch

from codistill.cli import main
from codistill.experiments.cells import cell_recipe, parse_method, search_space
from codistill.experiments.compare import compare
from codistill.config import ConfigError
from codistill.data import load_dataset
from codistill.records import final_metrics, read_records
from codistill.storage import RunStorage
from tests.conftest import REPO, small_config

RECIPE = "configs/compare_mnist1d.yaml"


def tiny(tmp_path, *overrides):
    return small_config(tmp_path, "train.steps=60", "train.eval_every=30", "train.checkpoint_every=30", *overrides,
                        base=RECIPE)


@pytest.mark.slow  # ~6 s: the full tier (the fast tier keeps the unfinished-cell resume)
def test_compare_resumes_without_rerunning_finished_cells_and_its_table_is_the_records(tmp_path):
    cfg = tiny(tmp_path)
    logs = []
    first = compare(cfg, ["independent", "kdcl:variant=mean", "dml:branches=2"], [0, 1], log=logs.append)
    checkpoint = tmp_path / "compare_mnist1d.independent.seed0/checkpoints/step_00000060/peer0.pt"
    stamp = os.stat(checkpoint).st_mtime_ns
    logs.clear()
    second = compare(cfg, ["independent", "kdcl:variant=mean", "dml:branches=2"], [0, 1], log=logs.append)
    assert sum("not rerun" in line for line in logs) == 6
    assert os.stat(checkpoint).st_mtime_ns == stamp
    assert second.table.to_pylist() == first.table.to_pylist()
    on_disk = pq.read_table(tmp_path / "compare_mnist1d/compare.parquet").to_pylist()
    assert on_disk == first.table.to_pylist()
    for row in on_disk:
        final = final_metrics(read_records(RunStorage(str(tmp_path), row["run"])))
        members = ([v[0] for k, v in sorted(final["head_accuracy"].items()) if k.startswith("branch")]
                   if row["one_network"] else final["peer_accuracy"])
        assert row["members"] == len(members) == 2
        assert row["last_mean"] == pytest.approx(sum(members) / len(members))
        assert row["last_first"] == pytest.approx(members[0])
        assert row["last_best"] == pytest.approx(max(members))
        assert row["last_step"] == 60
    assert (tmp_path / "compare_mnist1d/compare.png").stat().st_size > 0
    markdown = (tmp_path / "compare_mnist1d/compare.md").read_text()
    assert "| kdcl:variant=mean | 2 |" in markdown and "best evaluation" in markdown
    # a column only later rows have (a codistillation cell's bytes per round) is kept
    codistilled = compare(cfg, ["independent", "codistill:period=10"], [0], log=logs.append).table.to_pylist()
    assert codistilled[0]["bytes_per_round"] is None and codistilled[1]["bytes_per_round"] > 0


@pytest.mark.slow
def test_an_unfinished_cell_resumes_from_its_checkpoint(tmp_path):
    cfg = tiny(tmp_path, "peers.*.optimizer.schedule=constant")
    from codistill.engine.run import train

    partial = small_config(tmp_path, "train.steps=60", "train.eval_every=30", "train.checkpoint_every=30",
                           "method={name: dml}", "seed=0", "name=compare_mnist1d.dml.seed0",
                           "peers.*.optimizer.schedule=constant", base=RECIPE)

    def crash(step, metrics):  # interrupted after its checkpoint at step 30: unfinished
        if step >= 40:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(partial, "local", on_progress=crash)
    logs = []
    result = compare(cfg, ["dml"], [0], log=logs.append)
    rows = read_records(RunStorage(str(tmp_path), "compare_mnist1d.dml.seed0")).to_pylist()
    steps = [r["step"] for r in rows if r["split"] == "train" and r["peer"] == 0]
    assert steps == list(range(1, 61))  # 1..30 from the first run, 31..60 resumed: none twice
    assert result.table.to_pylist()[0]["last_step"] == 60


@pytest.mark.slow
def test_a_finished_cell_is_never_extended_by_a_rerun_with_more_steps(tmp_path, capsys):
    # A constant schedule, so `train` itself would allow the resume: compare must refuse it.
    args = ["compare", f"{REPO}/{RECIPE}", "--methods", "independent", "--seeds", "0", "--set",
            f"ray.storage_path={tmp_path}", "--set", "train.eval_every=30", "--set", "train.checkpoint_every=30",
            "--set", "peers.*.optimizer.schedule=constant", "--set", "peers.*.model=mnist1d_mlp"]
    assert main([*args, "--set", "train.steps=60"]) == 0
    cell = tmp_path / "compare_mnist1d.independent.seed0"
    before = {p: p.stat().st_mtime_ns for p in cell.rglob("*") if p.is_file()}
    table = (tmp_path / "compare_mnist1d" / "compare.md").read_text()
    capsys.readouterr()
    assert main([*args, "--set", "train.steps=80"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: train.steps: cell independent seed 0 in "), err
    assert "finished its 60 steps; this command asks 80" in err[0] and "never extended" in err[0]
    assert {p: p.stat().st_mtime_ns for p in cell.rglob("*") if p.is_file()} == before  # no cell changed
    assert (tmp_path / "compare_mnist1d" / "compare.md").read_text() == table


def test_method_specs_and_their_errors():
    spec = parse_method("kdcl:variant=min_logit,branches=3")
    assert (spec.name, spec.settings, spec.slug) == ("kdcl", {"variant": "min_logit", "branches": 3},
                                                      "kdcl.variant=min_logit.branches=3")
    with pytest.raises(ConfigError, match=r"--methods: 'kdlc': no method 'kdlc'; registered methods: .*kdcl"):
        parse_method("kdlc")
    with pytest.raises(ConfigError, match="key=value"):
        parse_method("kdcl:variant")
    assert main(["compare", f"{REPO}/{RECIPE}", "--methods", "dml", "kdcl:variant=maen", "--seeds", "0"]) == 2


def test_every_method_is_tuned_over_the_same_kind_of_space():
    base = {"peers": [{"model": "mnist1d_cnn", "optimizer": {"lr": 0.01}}] * 2, "data": {"batch_size": 100}}

    def space_of(label):
        spec = parse_method(label)
        return search_space(spec, cell_recipe(base, spec))

    every = {"peers.*.optimizer.lr", "peers.*.optimizer.schedule", "train.label_smoothing"}
    assert set(space_of("independent")) == every
    for method in ("dml", "kdcl", "okddip", "pcl", "one", "codistill"):
        assert set(space_of(method)) == every | {"method.temperature", "method.weight"}
    # data_parallel: the same space, around its own recipe point (Adam: the peers' lr × √K)
    space = space_of("data_parallel")
    assert set(space) == every and space["peers.*.optimizer.lr"] == f"loguniform({0.01 * 2 ** 0.5 / 4:.6g}, {0.01 * 2 ** 0.5 * 4:.6g})"
    # a value fixed on the command line is not searched
    assert "method.temperature" not in space_of("dml:temperature=1")
    assert "train.label_smoothing" not in space_of("data_parallel:train.label_smoothing=0.1")


def test_the_validation_split_is_held_out_of_training_and_the_same_every_time():
    full = load_dataset("mnist1d")
    a, b = load_dataset("mnist1d", validation=0.2), load_dataset("mnist1d", validation=0.2)
    assert len(a.y_test) == 800 and len(a.y_train) == 3200
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.x_train, b.x_train)
    train_rows = {tuple(x.flatten().tolist()) for x in a.x_train}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in a.x_test)
    test_rows = {tuple(x.flatten().tolist()) for x in full.x_test}
    assert not any(tuple(x.flatten().tolist()) in test_rows for x in a.x_test[:50])  # not the test set


def test_a_tuning_trial_is_evaluated_once_at_its_end_on_the_validation_split(tmp_path):
    from codistill.config import to_dict
    from codistill.experiments.compare import tuning_data

    base = to_dict(tiny(tmp_path))
    asked = tuning_data(parse_method("dml"), base, "x", 4)
    assert asked["train"]["eval_every"] == asked["train"]["steps"] == 60 != base["train"]["eval_every"]
    assert (asked["data"]["validation"], asked["data"]["test_examples"]) == (0.2, 0)


@pytest.mark.ray
def test_tuning_gives_each_method_its_trials_and_the_seeds_run_at_its_best(ray_local, tmp_path):
    cfg = tiny(tmp_path)
    result = compare(cfg, ["independent", "dml"], [0], tune_trials=2, log=lambda text: None)
    rows = {r["method"]: r for r in result.table.to_pylist()}
    for method in ("independent", "dml"):
        tuned = json.loads((tmp_path / f"compare_mnist1d/tuned/{method}.json").read_text())
        assert tuned["trials"] == 2 and json.loads(rows[method]["tuned"]) == tuned["params"]
        trials = pq.read_table(tmp_path / f"compare_mnist1d.{method}.tune/trials.parquet").to_pylist()
        assert len(trials) == 2 and all(t["status"] == "TERMINATED" for t in trials)
        stored = json.loads(json.dumps(__import__("yaml").safe_load(
            (tmp_path / f"compare_mnist1d.{method}.seed0/config.yaml").read_text())))
        assert stored["peers"][0]["optimizer"]["lr"] == pytest.approx(tuned["params"]["peers.*.optimizer.lr"])
        assert stored["data"]["validation"] == 0  # the seeds train on everything and test on the test set
        trial_run = next((tmp_path / f"compare_mnist1d.{method}.tune/runs").iterdir())
        assert __import__("yaml").safe_load((trial_run / "config.yaml").read_text())["data"]["validation"] == 0.2
    assert "method.temperature" in json.loads(rows["dml"]["tuned"])
    # The search starts at the recipe's (the paper's) setting: the first trial is the config's own
    # values, and a trial is the mean of two seeds' runs.
    dml = json.loads((tmp_path / "compare_mnist1d/tuned/dml.json").read_text())
    assert dml["default_params"] == {"peers.*.optimizer.lr": 0.01, "peers.*.optimizer.schedule": "constant",
                                     "method.temperature": 1.0, "method.weight": 1.0, "train.label_smoothing": 0.0}
    assert dml["default_objective"] is not None and dml["seeds_per_trial"] == 2
    trials = pq.read_table(tmp_path / "compare_mnist1d.dml.tune/trials.parquet").to_pylist()
    assert any(t["param:method.temperature"] == 1.0 and t["param:peers.*.optimizer.lr"] == 0.01 for t in trials)
    assert len(list((tmp_path / "compare_mnist1d.dml.tune/runs").iterdir())) == 4  # 2 trials × 2 seeds
    assert "what tuning bought" in result.markdown
    # a re-run reuses the tuning: no new trials
    again = compare(cfg, ["independent", "dml"], [0], tune_trials=2, log=lambda text: None)
    assert len(pq.read_table(tmp_path / "compare_mnist1d.dml.tune/trials.parquet")) == 2
    assert again.table.to_pylist() == result.table.to_pylist()


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_a_changed_recipe_stops_before_running_anything_naming_the_key_and_fresh_runs_it_again(tmp_path, capsys):
    cfg = tiny(tmp_path)
    compare(cfg, ["independent", "dml"], [0], log=lambda text: None)
    before = (tmp_path / "compare_mnist1d/compare.md").read_text()
    # Another learning rate and another model for peer 1 under the same name: not the cells on disk.
    argv = ["compare", f"{REPO}/{RECIPE}", "--methods", "independent", "dml", "--seeds", "0",
            "--set", f"ray.storage_path={tmp_path}", "--set", "train.steps=60", "--set", "train.eval_every=30",
            "--set", "train.checkpoint_every=30", "--set", "peers.1.model=mnist1d_mlp"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "peers.1.model='mnist1d_mlp'" in err[0] and "--fresh" in err[0], err
    assert (tmp_path / "compare_mnist1d/compare.md").read_text() == before  # nothing ran, nothing rewritten
    assert main(argv + ["--set", "peers.*.optimizer.lr=0.02"]) == 2
    assert "peers.0.optimizer.lr" in capsys.readouterr().err
    # --fresh discards those cells and runs what was asked.
    assert main(argv + ["--fresh"]) == 0
    out = capsys.readouterr().out
    assert "discarded (--fresh)" in out and "mnist1d_cnn + mnist1d_mlp" in out
    stored = __import__("yaml").safe_load((tmp_path / "compare_mnist1d.dml.seed0/config.yaml").read_text())
    assert stored["peers"][1]["model"] == "mnist1d_mlp"


def test_a_saved_tuning_of_another_recipe_is_not_reused(tmp_path):
    from codistill.config import to_dict
    from codistill.experiments.compare import saved_tuning, tuning_data

    cfg = tiny(tmp_path)
    base = to_dict(cfg)
    spec = parse_method("dml")
    asked = tuning_data(spec, base, cfg.name, 4)
    storage = RunStorage(str(tmp_path), cfg.name)
    storage.write_bytes("tuned/dml.json", json.dumps({"params": {}, "config": asked}).encode())
    assert saved_tuning(spec, asked, storage, fresh=False, log=print)["config"] == asked
    # A tuning saved before a setting existed trained with its default: it is the same tuning.
    older = json.loads(json.dumps(asked))
    del older["train"]["sharding"], older["exchange"]["targets"]
    storage.write_bytes("tuned/dml.json", json.dumps({"params": {}, "config": older}).encode())
    assert saved_tuning(spec, asked, storage, fresh=False, log=print) is not None
    other = tuning_data(spec, base, cfg.name, 6)  # another budget is another tuning
    with pytest.raises(ConfigError, match=r"tune\.num_samples=6.*--fresh"):
        saved_tuning(spec, other, storage, fresh=False, log=print)
    assert saved_tuning(spec, other, storage, fresh=True, log=lambda text: None) is None
    assert not storage.exists("tuned/dml.json")


def test_paired_differences_their_interval_and_wins():
    from codistill.experiments.paired import paired_differences, resolving_seeds, t_interval

    rows = []
    for seed, (base, dml) in enumerate([(0.90, 0.92), (0.91, 0.92), (0.93, 0.93), (0.92, 0.95)]):
        rows.append({"method": "independent", "seed": seed, "last_mean": base, "last_ensemble": base, "last_best": base})
        rows.append({"method": "dml", "seed": seed, "last_mean": dml, "last_ensemble": base, "last_best": dml})
    (entry,) = paired_differences(rows, "independent")
    # differences 2, 1, 0, 3 points: mean 1.5, sd 1.291, t(3) = 3.182 → half-width 2.054
    assert entry["diff_mean"] == pytest.approx(1.5)
    assert entry["diff_mean_low"] == pytest.approx(1.5 - 3.182 * 1.2909944 / 2, abs=1e-4)
    assert entry["diff_wins_mean"] == 3 and entry["seeds"] == 4
    assert entry["diff_ensemble"] == 0 and entry["diff_wins_ensemble"] == 0
    assert [r["diff_mean"] for r in rows if r["method"] == "dml"] == pytest.approx([2, 1, 0, 3])
    assert t_interval([1.0])[1] == float("-inf")
    assert resolving_seeds([2, 1, 0, 3]) > 4  # ±0.5 needs more seeds than ±2.05
    # Bits per token (language models): in bits, unscaled, and a win is fewer bits.
    for r, bits in zip(rows, [8.0, 7.5, 8.1, 7.9, 8.2, 8.3, 8.0, 7.7]):
        r.update({f"bits_{k}": bits for k in ("mean", "ensemble", "best")})
    (entry,) = paired_differences(rows, "independent", "bits_{}", scale=1, prefix="bits_diff", lower_is_better=True)
    assert entry["bits_diff_mean"] == pytest.approx((-0.5 - 0.2 + 0.1 - 0.3) / 4)
    assert entry["bits_diff_wins_mean"] == 3  # fewer bits on seeds 0, 1 and 3


def test_the_same_seed_gives_the_same_initial_weights_and_batches_under_any_two_methods(tmp_path):
    from codistill.engine.job import make_job, peer_schedules
    from codistill.exchange import LocalGatherHub

    data = load_dataset("mnist1d")
    built = {}
    for method in ("independent", "dml", "kdcl", "codistill", "okddip"):
        cfg = small_config(tmp_path, f"method={method}", "seed=3", base=RECIPE)
        schedules = peer_schedules(cfg, len(data.y_train))
        hub = LocalGatherHub(cfg.num_peers)
        jobs = [make_job(cfg, k, data, schedules, torch.device("cpu"), hub.exchange_for(k)) for k in range(cfg.num_peers)]
        built[method] = [({n: t.clone() for n, t in job.peer.base.state_dict().items()},
                          [job.schedule.indices(step).tolist() for step in (0, 1, 77)]) for job in jobs]
    reference = built.pop("independent")
    for method, peers in built.items():
        for k, (weights, batches) in enumerate(peers):
            assert batches == reference[k][1], (method, k)
            assert weights.keys() == reference[k][0].keys()
            assert all(torch.equal(weights[n], reference[k][0][n]) for n in weights), (method, k)
    other_seed = small_config(tmp_path, "method=dml", "seed=4", base=RECIPE)
    job = make_job(other_seed, 0, data, peer_schedules(other_seed, len(data.y_train)), torch.device("cpu"),
                   LocalGatherHub(2).exchange_for(0))
    assert not torch.equal(next(iter(job.peer.base.state_dict().values())), next(iter(reference[0][0].values())))


def test_a_methods_value_that_is_not_yaml_is_one_line_and_lists_are_values():
    spec = parse_method("at:taps=[conv2,conv3],weight=2")
    assert spec.settings == {"taps": ["conv2", "conv3"], "weight": 2}
    with pytest.raises(ConfigError, match=r"the value of 'variant' is not valid YAML"):
        parse_method("kdcl:variant=[mean")


def test_data_parallel_is_one_model_on_all_the_groups_workers_with_their_summed_batch(tmp_path):
    """The arm a user with K·M workers has besides K peers on M each: one model, the K peers'
    workers, batches and resources summed, its recipe's lr scaled by the stated rule."""
    from codistill.config import to_dict
    from codistill.experiments.cells import cell_config

    base = to_dict(small_config(tmp_path, "ray.workers_per_peer=2", "ray.resources_per_peer={CPU: 1.5}",
                                "peers.0.optimizer.lr=0.01", "peers.1.optimizer.lr=0.01", base="configs/codistill_mnist1d.yaml"))
    cell = cell_config(base, parse_method("data_parallel"), None, 3, "c")
    assert (cell.method.name, len(cell.peers), cell.peers[0].model) == ("independent", 1, base["peers"][0]["model"])
    assert cell.data.batch_size == 2 * base["data"]["batch_size"]
    assert (cell.ray.workers_per_peer, cell.ray.resources_per_peer) == (4, {"CPU": 3.0})
    assert cell.peers[0].optimizer.lr == pytest.approx(0.01 * 2 ** 0.5)  # Adam: √K
    assert (cell.seed, cell.name) == (3, "c.data_parallel.seed3")
    sgd = to_dict(small_config(tmp_path, "peers.*.optimizer={name: sgd, lr: 0.1}", base="configs/codistill_mnist1d.yaml"))
    assert cell_config(sgd, parse_method("data_parallel"), None, 0, "c").peers[0].optimizer.lr == pytest.approx(0.2)
    # What it cannot be, said in one line.
    with pytest.raises(ConfigError, match="the peers must be one model"):
        cell_config(to_dict(small_config(tmp_path, "peers.1.model=mnist1d_mlp")), parse_method("data_parallel"), None, 0, "c")
    with pytest.raises(ConfigError, match="no method settings"):
        parse_method("data_parallel:temperature=2")
    with pytest.raises(ConfigError, match=r"registered methods: .* \(and data_parallel"):
        parse_method("data_paralel")


@pytest.mark.ray
def test_data_parallel_on_ray_is_ddp_over_the_groups_workers_and_steps_as_the_local_runner(ray_local, tmp_path):
    """One SGD step of the `data_parallel` arm: on Ray two DDP workers each take half of the global
    batch and average their gradients; the local runner takes the gradient of the mean over the
    whole batch in one process. The same gradient, so the same weights after the step."""
    from codistill.config import to_dict
    from codistill.engine.checkpoint import checkpoint_folders, from_bytes
    from codistill.engine.run import train
    from codistill.experiments.cells import cell_config

    base = to_dict(small_config(tmp_path, "train.steps=1", "train.eval_every=1", "train.checkpoint_every=1",
                                "peers.*.optimizer={name: sgd, lr: 0.5, momentum: 0.0}", "data.augment=false"))
    weights = {}
    for backend in ("local", "ray"):
        cell = cell_config(base, parse_method("data_parallel"), None, 0, f"dp-{backend}")
        assert cell.ray.workers_per_peer == 2 and cell.data.batch_size == 2 * base["data"]["batch_size"]
        result = train(cell, backend)
        step, folder = checkpoint_folders(result.storage)[-1]
        assert step == 1
        weights[backend] = from_bytes(result.storage.read_bytes(f"{folder}/peer0.pt"))["model"]
    assert weights["ray"].keys() == weights["local"].keys()
    for name, w in weights["local"].items():
        torch.testing.assert_close(weights["ray"][name], w, rtol=1e-5, atol=1e-6, msg=name)


def test_steps_to_target_are_the_first_evaluation_past_it_paired_by_seed_and_a_miss_is_reported():
    from codistill.experiments import speed

    def row(method, seed, metric, models=2, batch=100):
        return {"method": method, "seed": seed, "curve_step": [100, 200, 300], "curve_metric": metric,
                "curve_seconds": [1.0, 2.0, 3.0], "curve_score": "accuracy", "examples_per_step": batch,
                "models": models}
    rows = [row("data_parallel", 0, [0.5, 0.8, 0.9], 1, 200), row("data_parallel", 1, [0.6, 0.85, 0.88], 1, 200),
            row("codistill", 0, [0.7, 0.9, 0.95]), row("codistill", 1, [0.5, 0.6, 0.7])]
    target = speed.default_target(rows, "data_parallel")
    assert target == pytest.approx(0.89)
    speed.reach(rows, target)
    assert [r["target_step"] for r in rows] == [300, None, 200, None]
    assert (rows[0]["target_examples_per_model"], rows[0]["target_examples_total"]) == (60_000, 60_000)
    assert (rows[2]["target_examples_per_model"], rows[2]["target_examples_total"], rows[2]["target_seconds"]) == (20_000, 40_000, 2.0)
    summary = {e["method"]: e for e in speed.paired_steps(rows, "data_parallel")}
    assert (summary["codistill"]["reached"], summary["codistill"]["paired"], summary["codistill"]["diff"]) == (1, 1, -100)
    text = "\n".join(speed.markdown_section(rows, target, "test", "data_parallel"))
    assert ("| codistill | 1/2 | 200 | 20,000 | 40,000 | 2.0 | -100 [n/a: 1 seed] over 1 seeds (no resolvable effect) | "
            "0.67× [n/a: 1 seed] (no resolvable effect) | 0, 0 |") in text
    # Seed 1: neither reached it. Had the data-parallel seed 1 reached it alone, the table says so.
    rows[1]["target_step"] = 300
    summary = {e["method"]: e for e in speed.paired_steps(rows, "data_parallel")}
    assert (summary["codistill"]["only_arm"], summary["codistill"]["only_baseline"]) == (0, 1)
    # Lower is better for bits per token.
    bits = [{**row("a", 0, [3.0, 2.5, 2.0]), "curve_score": "bits"}]
    speed.reach(bits, 2.4)
    assert bits[0]["target_step"] == 300


@pytest.mark.slow
def test_a_comparison_with_data_parallel_reports_steps_to_its_final_quality(tmp_path):
    cfg = tiny(tmp_path, "name=dp")
    result = compare(cfg, ["data_parallel", "independent"], [0, 1], log=lambda *_: None)
    rows = result.table.to_pylist()
    final = [r["curve_metric"][-1] for r in rows if r["method"] == "data_parallel"]
    assert all(r["curve_step"] == [30, 60] for r in rows) and final == [r["last_mean"] for r in rows[:2]]
    assert "steps to reach" in result.markdown and "data_parallel's own final quality" in result.markdown
    # The data-parallel arm trains one model on the summed batch: the same examples in total per step.
    assert {(r["method"], r["models"], r["examples_per_step"]) for r in rows} == {
        ("data_parallel", 1, 2 * cfg.data.batch_size), ("independent", 2, cfg.data.batch_size)}
    assert result.storage.exists("compare.png")
