"""The data-parallel baseline as a transform of a config (`config.data_parallel`): one peer on all
the K peers' workers, with the schema's defaults and no others, the same for `codistill compare`'s
`data_parallel` arm and for `codistill train --data-parallel`."""

import dataclasses

import pytest

from codistill.cli import main
from codistill.config import DataConfig, OptimizerConfig, data_parallel, load_config, to_dict
from codistill.experiments.cells import cell_config, cell_recipe, parse_method
from codistill.records import read_records
from codistill.storage import RunStorage
from tests.conftest import REPO, small_config


def test_the_transform_takes_the_schemas_defaults_and_no_others(tmp_path):
    written = tmp_path / "plain.yaml"
    written.write_text("name: plain\nmethod: {name: dml}\npeers: [{model: mnist1d_cnn}, {model: mnist1d_cnn}, "
                       "{model: mnist1d_cnn}]\n")
    cfg = load_config(written)
    one = data_parallel(cfg)
    assert one.data.batch_size == 3 * DataConfig().batch_size  # 3 × 128, not a default of its own
    assert one.peers[0].optimizer.lr == pytest.approx(OptimizerConfig().lr * 3 ** 0.5)  # Adam: √K
    assert (one.method.name, len(one.peers), one.ray.workers_per_peer) == ("independent", 1, 3)
    # Everything else is the config's own.
    for section in ("train", "exchange", "seed", "name"):
        assert getattr(one, section) == getattr(cfg, section), section
    assert dataclasses.replace(one.data, batch_size=cfg.data.batch_size) == cfg.data


def test_compare_runs_the_transform_once_per_cell(tmp_path, monkeypatch):
    import codistill.experiments.cells as cells
    from codistill.experiments.compare import tuning_data

    calls = []
    monkeypatch.setattr(cells, "data_parallel", lambda cfg: calls.append(cfg.name) or data_parallel(cfg))
    base = to_dict(small_config(tmp_path))
    cell_config(base, parse_method("data_parallel"), None, 0, "c")
    assert len(calls) == 1
    tuning_data(parse_method("data_parallel"), base, "c", 2)  # its recipe and its search space from one transform
    assert len(calls) == 2


def test_train_data_parallel_trains_the_compare_arms_config_and_first_steps(tmp_path):
    from codistill.engine.run import train

    sets = ["train.steps=4", "train.eval_every=2", "train.checkpoint_every=2", f"ray.storage_path={tmp_path}"]
    assert main(["train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local", "--data-parallel",
                 *[a for s in sets for a in ("--set", s)]]) == 0
    cfg = load_config(f"{REPO}/configs/dml_mnist1d.yaml", sets)
    cell = cell_config(to_dict(cfg), parse_method("data_parallel"), None, cfg.seed, "arm")
    trained = RunStorage(str(tmp_path), f"{cfg.name}.data_parallel")
    saved = load_config(to_dict(cell))  # the arm's config is the one the command trained, but for its name
    assert dataclasses.replace(saved, name=f"{cfg.name}.data_parallel") == data_parallel(
        dataclasses.replace(cfg, name=f"{cfg.name}.data_parallel"))
    arm = train(cell, "local")
    losses = [[(r["step"], r["loss"]) for r in table.to_pylist() if r["split"] == "train"]
              for table in (read_records(trained), arm.records)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    assert cell_recipe(to_dict(cfg), parse_method("data_parallel"))["data"]["batch_size"] == 2 * cfg.data.batch_size
