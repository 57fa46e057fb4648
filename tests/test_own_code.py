"""Your own model, data and method: registered in a script or a module, they reach every runner;
the mistakes a user meets first are one line each."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from codistill import ArrayDataset, ConfigError, load_config, register_dataset, register_model, train
from codistill.cli import main
from tests.conftest import REPO


@register_model("test_three_logits", input_kind="sequence")
def three_logits(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 3))  # ignores num_classes: a classic mistake


@register_dataset("test_bad_labels", input_kind="sequence", num_classes=3, train_examples=64)
def bad_labels(root, augment, download) -> ArrayDataset:
    x = torch.randn(64, 1, 40)
    y = torch.arange(64) % 5  # labels 0..4 for a 3-class data set
    return ArrayDataset(x, y, x[:16], y[:16], num_classes=3, input_kind="sequence")


def quick(tmp_path, **changes):
    return load_config({"name": "own", "method": {"name": "dml"}, "peers": [{"model": "mnist1d_mlp"}] * 2,
                        "data": {"name": "synthetic", "batch_size": 32},
                        "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2},
                        "ray": {"storage_path": str(tmp_path)}, **changes})


def test_a_model_whose_output_is_not_batch_by_classes_is_one_line_naming_the_peer(tmp_path):
    with pytest.raises(ConfigError) as info:
        train(quick(tmp_path, peers=[{"model": "mnist1d_mlp"}, {"model": "test_three_logits"}]), "local")
    assert info.value.path == "peers.1.model" and "returns [2, 3]" in info.value.message
    assert "[2, 10]" in info.value.message


def test_labels_beyond_the_classes_are_one_line_naming_the_data_set(tmp_path):
    with pytest.raises(ConfigError) as info:
        train(quick(tmp_path, data={"name": "test_bad_labels", "batch_size": 32}), "local")
    assert info.value.path == "data.name" and "labels from 0 to 4" in info.value.message


def test_a_module_that_cannot_be_imported_names_its_place(tmp_path, capsys):
    with pytest.raises(ConfigError) as info:
        quick(tmp_path, imports=["tests.seam_method", "no_such_package.models"])
    assert info.value.path == "imports.1" and "no_such_package" in info.value.message
    code = main(["train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local", "--import", "no_such_module"])
    assert code == 2 and "imports.0: cannot import 'no_such_module'" in capsys.readouterr().err


def test_the_cli_imports_a_users_module_before_reading_the_config(tmp_path, capsys):
    code = main(["train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local", "--import", "tests.seam_method",
                 "--set", "method={name: test_tap_agreement}", "--set", f"ray.storage_path={tmp_path}",
                 "--set", "train.steps=20", "--set", "train.eval_every=10", "--set", "train.checkpoint_every=10"])
    assert code == 0
    assert "imports:\n- tests.seam_method" in capsys.readouterr().out  # recorded in the resolved config


@pytest.mark.ray
def test_the_example_trains_its_own_model_and_data_identically_on_both_runners(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(REPO, "examples", "own_model.py"), "--storage", str(tmp_path),
                          "--steps", "200"], capture_output=True, text=True, timeout=400, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "identical: True" in out.stdout
    assert (tmp_path / "own-ray" / "records.parquet").exists()
