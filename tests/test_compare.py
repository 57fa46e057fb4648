"""`codistill compare`: a finished cell is never rerun, the table is the runs' records, every
method gets the same tuning budget on a validation split the test set never enters."""

import json
import os

import pyarrow.parquet as pq
import pytest
import torch

from codistill.cli import main
from codistill.experiments.compare import compare, parse_method, search_space
from codistill.config import ConfigError
from codistill.data import load_dataset
from codistill.records import final_metrics, read_records
from codistill.storage import RunStorage
from tests.conftest import REPO, small_config

RECIPE = "configs/compare_mnist1d.yaml"


def tiny(tmp_path, *overrides):
    return small_config(tmp_path, "train.steps=60", "train.eval_every=30", "train.checkpoint_every=30", *overrides,
                        base=RECIPE)


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


def test_an_unfinished_cell_resumes_from_its_checkpoint(tmp_path):
    cfg = tiny(tmp_path, "peers.*.optimizer.schedule=constant")
    from codistill.engine.run import train

    partial = small_config(tmp_path, "train.steps=30", "train.eval_every=30", "train.checkpoint_every=30",
                           "method={name: dml}", "seed=0", "name=compare_mnist1d.dml.seed0",
                           "peers.*.optimizer.schedule=constant", base=RECIPE)
    train(partial, "local")
    logs = []
    result = compare(cfg, ["dml"], [0], log=logs.append)
    rows = read_records(RunStorage(str(tmp_path), "compare_mnist1d.dml.seed0")).to_pylist()
    steps = [r["step"] for r in rows if r["split"] == "train" and r["peer"] == 0]
    assert steps == list(range(1, 61))  # 1..30 from the first run, 31..60 resumed: none twice
    assert result.table.to_pylist()[0]["last_step"] == 60


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
    base = {"peers": [{"optimizer": {"lr": 0.01}}]}
    assert set(search_space(parse_method("independent"), base)) == {"peers.*.optimizer.lr", "peers.*.optimizer.schedule"}
    for method in ("dml", "kdcl", "okddip", "pcl", "one", "codistill"):
        assert set(search_space(parse_method(method), base)) == {
            "peers.*.optimizer.lr", "peers.*.optimizer.schedule", "method.temperature", "method.weight"}
    # a value fixed on the command line is not searched
    assert "method.temperature" not in search_space(parse_method("dml:temperature=1"), base)


def test_the_validation_split_is_held_out_of_training_and_the_same_every_time():
    full = load_dataset("mnist1d")
    a, b = load_dataset("mnist1d", validation=0.2), load_dataset("mnist1d", validation=0.2)
    assert len(a.y_test) == 800 and len(a.y_train) == 3200
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.x_train, b.x_train)
    train_rows = {tuple(x.flatten().tolist()) for x in a.x_train}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in a.x_test)
    test_rows = {tuple(x.flatten().tolist()) for x in full.x_test}
    assert not any(tuple(x.flatten().tolist()) in test_rows for x in a.x_test[:50])  # not the test set


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
    # a re-run reuses the tuning: no new trials
    again = compare(cfg, ["independent", "dml"], [0], tune_trials=2, log=lambda text: None)
    assert len(pq.read_table(tmp_path / "compare_mnist1d.dml.tune/trials.parquet")) == 2
    assert again.table.to_pylist() == result.table.to_pylist()
