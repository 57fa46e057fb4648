"""Bad input a hostile but realistic user gives (issues 24 and 30), one class per test: nothing
silently wrong, nothing executed, and every refusal one line naming what is wrong."""

from __future__ import annotations

import pytest

from codistill.engine.run import train
from tests.conftest import small_config


# -- 5: non-finite inputs are refused at load; no accuracy from non-finite logits -----------------

def _quick(tmp_path, **changes):
    from codistill.config import load_config

    return load_config({"name": "own", "method": {"name": "dml"}, "peers": [{"model": "mnist1d_mlp"}] * 2,
                        "data": {"name": "synthetic", "batch_size": 32},
                        "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2},
                        "ray": {"storage_path": str(tmp_path)}, **changes})


@pytest.mark.parametrize("split", ["training", "test"])
def test_non_finite_inputs_are_one_line_naming_the_data_set(tmp_path, split):
    import torch

    from codistill.errors import ConfigError

    x, y = torch.randn(64, 1, 40), torch.arange(64) % 10
    x_test = x[:16].clone()
    (x if split == "training" else x_test)[3, 0, 7] = float("nan")
    with pytest.raises(ConfigError) as info:
        train(_quick(tmp_path), "local", data=((x, y), (x_test, y[:16])))
    assert info.value.path == "data.name" and f"{split} inputs" in info.value.message, info.value
    assert "not finite" in info.value.message and "example 3" in info.value.message
    assert "\n" not in str(info.value)


def test_an_evaluation_whose_logits_are_not_finite_reports_no_accuracy(tmp_path):
    from torch import nn

    from codistill.errors import RunError
    from codistill.models import register_model

    class NanWhenEvaluated(nn.Module):  # a model wrong only in eval mode (a bad running statistic, say)
        def __init__(self, num_classes):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(40, num_classes))

        def forward(self, x):
            z = self.body(x)
            return z if self.training else z * float("nan")

    register_model("test_nan_when_evaluated", input_kind="sequence")(NanWhenEvaluated)
    with pytest.raises(RunError, match="test logits .* not finite"):
        train(_quick(tmp_path, peers=[{"model": "mnist1d_mlp"}, {"model": "test_nan_when_evaluated"}]), "local")
    assert not list((tmp_path / "own").rglob("meta.pt"))  # no checkpoint carries the bad evaluation


# -- 3: a CIFAR checksum cannot be planted -------------------------------------------------------

def _plant(path, marker, size=None):
    """A pickle that would run code (it creates `marker`), padded to `size` (pickle stops at its
    STOP opcode, so the padding is never read)."""
    import pickle

    from tests.test_data import Planted

    data = pickle.dumps(Planted(str(marker)))
    path.write_bytes(data + b"\0" * ((size or len(data)) - len(data)))


def test_a_planted_cifar_pickle_with_a_planted_verified_entry_never_runs(tmp_path, monkeypatch):
    import json
    import os

    from codistill.data import load_dataset
    from codistill.errors import ConfigError
    from tests.test_data import _trust_tiny_cifar, _write_cifar

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))  # this user's own cache
    root = tmp_path / "shared"
    root.mkdir()
    _write_cifar(root, 10)
    _trust_tiny_cifar(monkeypatch, root, 10)
    folder = root / "cifar-10-batches-py"
    marker = tmp_path / "pwned"
    # Whoever can write the data folder plants a pickle and the entry that says it was verified,
    # in the cache's old place (beside the data) and in every format it could take.
    _plant(folder / "data_batch_1", marker)
    stat = os.stat(folder / "data_batch_1")
    import torchvision

    expected = dict(torchvision.datasets.CIFAR10.train_list)["data_batch_1"]
    (folder / ".codistill-verified.json").write_text(json.dumps(
        {"data_batch_1": [stat.st_size, stat.st_mtime_ns, expected]}))
    with pytest.raises(ConfigError) as info:
        load_dataset("cifar10", root=str(root))
    assert info.value.path == "data.root" and "data_batch_1" in info.value.message and "\n" not in str(info.value)
    assert not marker.exists()
    # Verified once, then replaced by a pickle of the same size with the old modification time
    # put back: still hashed again, still refused.
    _write_cifar(tmp_path / "again", 10)
    _trust_tiny_cifar(monkeypatch, tmp_path / "again", 10)
    load_dataset("cifar10", root=str(tmp_path / "again"))
    target = tmp_path / "again" / "cifar-10-batches-py" / "data_batch_1"
    before = os.stat(target)
    _plant(target, marker, size=before.st_size)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ConfigError, match="checksum"):
        load_dataset("cifar10", root=str(tmp_path / "again"))
    assert not marker.exists()


# -- 7: a text corpus keeps every UTF-8 file, wherever its characters fall -----------------------

def test_utf8_files_whose_first_4096_bytes_end_inside_a_character_are_text(tmp_path):
    from codistill.data.text import text_files

    for cut in range(3):  # the sniffed bytes end after each byte of a 3-byte character
        (tmp_path / f"chinese{cut}.txt").write_text("a" * cut + "中文注释" * 600, encoding="utf-8")
    (tmp_path / "emoji.txt").write_text("b" + "🙂" * 1500, encoding="utf-8")  # 4-byte characters
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 20)
    (tmp_path / "latin1.txt").write_bytes("café ".encode("latin-1") * 100)  # not UTF-8 anywhere
    _, files = text_files(str(tmp_path))
    assert [f.name for f in files] == ["chinese0.txt", "chinese1.txt", "chinese2.txt", "emoji.txt"]


# -- 9: one line instead of a traceback ----------------------------------------------------------

def _last_err_line(capsys) -> str:
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    return err[-1] if err else ""


@pytest.mark.parametrize("source,cause", [
    ("raise RuntimeError('no GPU here')", "RuntimeError: no GPU here"),
    ("def broken(:\n    pass", "SyntaxError"),
    ("from codistill.models import register_model\n\n@register_model('mnist1d_mlp', input_kind='sequence')\n"
     "def mine(num_classes):\n    return None", "model 'mnist1d_mlp' is registered twice"),
])
def test_a_users_module_that_fails_to_import_is_one_line_naming_it(tmp_path, monkeypatch, capsys, source, cause):
    import uuid

    from codistill.cli import main

    module = f"user_module_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(source + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["list", "models", "--import", module]) == 2
    last = _last_err_line(capsys)
    assert last.startswith(f"config error: imports.0: cannot import {module!r}") and cause in last, last


def test_a_name_registered_twice_is_one_config_error_naming_both_places():
    from codistill.errors import ConfigError
    from codistill.models import register_model

    with pytest.raises(ConfigError) as info:
        register_model("mnist1d_mlp", input_kind="sequence")(lambda num_classes: None)
    assert "registered twice" in str(info.value) and "codistill.models" in str(info.value)


@pytest.mark.parametrize("fault", ["train_mode", "batch_size"])
def test_a_model_wrong_only_in_training_mode_or_at_the_real_batch_size_is_one_line(tmp_path, fault):
    import torch
    from torch import nn

    from codistill.errors import ConfigError
    from codistill.models import MODELS, register_model

    class Quirky(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.head = nn.Linear(40, num_classes)

        def forward(self, x):
            z = self.head(x.flatten(1))
            if fault == "train_mode" and self.training:
                return z, z.detach()  # an auxiliary output in training mode only (GoogLeNet's habit)
            return z.view(2, -1) if fault == "batch_size" else z  # a batch of 2 hard-wired in

    name = f"test_quirky_{fault}"
    if name not in MODELS:
        register_model(name, input_kind="sequence")(Quirky)
    with pytest.raises(ConfigError) as info:
        train(_quick(tmp_path, peers=[{"model": "mnist1d_mlp"}, {"model": name}]), "local")
    assert info.value.path == "peers.1.model" and "training mode" in info.value.message, info.value
    assert "32" in info.value.message  # the real batch size
    assert not list((tmp_path / "own").rglob("meta.pt"))
    torch.manual_seed(0)


@pytest.mark.parametrize("damage", [b"peers: [unclosed", b"\x00\xff binary", b"- a list\n- not a config\n"])
def test_report_on_a_run_whose_stored_config_is_unreadable_is_one_line(tmp_path, capsys, damage):
    from codistill.cli import main

    train(small_config(tmp_path, "name=done", "train.steps=20", "train.eval_every=10", "train.checkpoint_every=10"),
          "local")
    (tmp_path / "done" / "config.yaml").write_bytes(damage)
    assert main(["report", str(tmp_path / "done")]) == 2
    last = _last_err_line(capsys)
    assert last.startswith("config error: ") and "config.yaml" in last, last


def test_a_one_seed_comparison_prints_no_infinite_interval_and_no_effect(tmp_path):
    from codistill.experiments.compare_report import markdown_table
    from codistill.experiments.paired import paired_differences

    rows = [{"method": m, "seed": 0, "last_mean": a, "last_ensemble": a, "last_best": a, "members": 2,
             **{f"{p}_{k}": a for p in ("last", "bestevaluation") for k in ("first", "best", "mean", "ensemble", "churn")}}
            for m, a in (("independent", 0.80), ("dml", 0.95))]
    differences = paired_differences(rows, "independent")
    text = markdown_table(rows, small_config(tmp_path), 0, differences, "independent")
    line = next(t for t in text.splitlines() if t.startswith("| dml |"))
    assert "inf" not in text and line.count("[n/a: 1 seed]") == 3, line
    assert line.count("(no resolvable effect)") == 3, line  # +15 points on one seed is no effect yet


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "folder"])
def test_a_config_path_that_is_no_regular_file_says_what_it_is(tmp_path, capsys, kind):
    import os

    from codistill.cli import main

    path = {"/dev/zero": "/dev/zero", "fifo": str(tmp_path / "config.yaml"), "folder": str(tmp_path)}[kind]
    if kind == "fifo":
        os.mkfifo(path)  # opened for reading, it would wait for a writer forever
    assert main(["train", path, "--backend", "local"]) == 2
    what = {"/dev/zero": "a character device", "fifo": "a pipe (FIFO)", "folder": "a folder"}[kind]
    assert _last_err_line(capsys) == (f"config error: config file {path!r} is {what}, not a regular file: "
                                      "a YAML file is expected")


def test_the_run_name_rule_says_ascii_letters():
    from codistill.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        small_config("/tmp", "name=café")
    assert info.value.path == "name" and "ASCII letters" in info.value.message, info.value


def test_a_run_its_data_refuses_leaves_no_config_and_no_folder_behind(tmp_path):
    import torch

    from codistill.errors import ConfigError

    x, y = torch.randn(64, 1, 40), torch.arange(64) % 10
    x[3, 0, 7] = float("nan")
    with pytest.raises(ConfigError, match="not finite"):
        train(_quick(tmp_path), "local", data=((x, y), (x[:16].clone(), y[:16])))
    assert not (tmp_path / "own").exists(), sorted(p.name for p in (tmp_path / "own").rglob("*"))
