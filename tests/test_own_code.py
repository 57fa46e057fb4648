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
from tests.conftest import REPO, scaled


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
                          "--steps", "200"], capture_output=True, text=True, timeout=scaled(400), cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "identical: True" in out.stdout
    assert (tmp_path / "own-ray" / "records.parquet").exists()


def sequences(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    return torch.randn(5, 1, 40, generator=torch.Generator().manual_seed(9))[y] + torch.randn(n, 1, 40, generator=g), y


def test_train_takes_your_tensors_or_a_dataset_and_records_which(tmp_path):
    from torch.utils.data import TensorDataset

    train_split, test_split = sequences(400, 1), sequences(100, 2)
    cfg = quick(tmp_path, train={"steps": 60, "eval_every": 30, "checkpoint_every": 30})
    from_tensors = train(cfg, "local", data=(train_split, test_split))
    name = from_tensors.config.data.name
    assert name.startswith("given-") and f"name: {name}" in from_tensors.storage.read_bytes("config.yaml").decode()
    from_datasets = train(load_config({**__import__("codistill").config.to_dict(cfg), "name": "ds"}), "local",
                          data=(TensorDataset(*train_split), TensorDataset(*test_split)))
    assert from_datasets.config.data.name == name  # the same content, the same data set
    assert from_datasets.final == from_tensors.final  # and the same (seed, step) → batch schedule
    assert from_tensors.final["ensemble_accuracy"] > 0.5  # 5 classes: chance is 0.2
    with pytest.raises(ConfigError):  # resuming a run with other data is refused
        train(cfg, "local", data=(sequences(400, 3), test_split))


def write_image_folder(root, classes=("cat", "dog", "eel"), train=8, test=4):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("test", test)):
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(36, 40, 3, generator=g) * 80 + 60 * k).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_an_image_folder_trains_like_cifar(tmp_path):
    from codistill.data import load_dataset

    write_image_folder(tmp_path / "pets")
    data = load_dataset("imagefolder", root=str(tmp_path / "pets"))
    assert data.x_train.shape == (24, 3, 32, 32) and data.x_train.dtype == torch.uint8
    assert data.num_classes == 3 and data.y_train.tolist() == [0] * 8 + [1] * 8 + [2] * 8  # sorted class folders
    x, _ = data.train_batch(torch.arange(8), torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 1.0  # normalised, augmented
    cfg = load_config({"name": "pets", "method": {"name": "dml"}, "peers": [{"model": "resnet20"}] * 2,
                       "data": {"name": "imagefolder", "root": str(tmp_path / "pets"), "batch_size": 8},
                       "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2},
                       "ray": {"storage_path": str(tmp_path / "runs")}})
    assert train(cfg, "local").final["step"] == 4
    with pytest.raises(ConfigError) as info:
        load_dataset("imagefolder", root=str(tmp_path))
    assert info.value.path == "data.root" and "train/ and test/" in info.value.message


@pytest.mark.ray
def test_given_data_reaches_the_ray_workers_and_trains_exactly_as_locally(ray_local, tmp_path):
    cfg = quick(tmp_path, train={"steps": 40, "eval_every": 20, "checkpoint_every": 20})
    data = (sequences(400, 1), sequences(100, 2))
    local = train(cfg, "local", data=data)
    on_ray = train(load_config({**__import__("codistill").config.to_dict(cfg), "name": "on-ray"}), "ray", data=data)
    assert on_ray.final == local.final
