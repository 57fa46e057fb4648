"""Faults a hostile but realistic user or operator meets (issue 24), one class per test: nothing
silently wrong, nothing lost, nothing executed, and every failure one line."""

from __future__ import annotations

import pytest

from codistill.engine.run import train
from codistill.records import read_records
from codistill.storage import RunStorage
from tests.conftest import phase, scaled, small_config, wait_until


def _crash_at(limit: int):
    def crash(step, metrics):
        if step >= limit:
            raise RuntimeError("simulated crash")
    return crash


def _train_steps(table, peer=0) -> list[int]:
    return [r["step"] for r in table.to_pylist() if r["split"] == "train" and r["peer"] == peer]


def _test_rows(table) -> list[tuple]:
    return [(r["step"], r["peer"], r["accuracy"], r["ensemble_accuracy"], r["churn"])
            for r in table.to_pylist() if r["split"] == "test"]


# -- 2: a damaged newest checkpoint never counts as kept -------------------------------------------

@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_a_damaged_newest_checkpoint_never_counts_as_kept_nor_its_training_as_recorded(tmp_path):
    from codistill.cli import _saved_up_to

    reference = train(small_config(tmp_path, "name=whole"), "local")
    cfg = small_config(tmp_path, "name=damaged", "train.keep_checkpoints=1")
    with pytest.raises(RuntimeError):  # a checkpoint at 80 (40 pruned), then the crash
        train(cfg, "local", on_progress=_crash_at(100))
    newest = tmp_path / "damaged" / "checkpoints" / "step_00000080" / "peer1.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(RuntimeError):  # starts over (nothing loads), checkpoints at 40, then the crash
        train(cfg, "local", on_progress=_crash_at(60))
    kept = sorted(p.parent.name for p in (tmp_path / "damaged" / "checkpoints").glob("step_*/meta.pt"))
    assert kept == ["step_00000040"]  # the new good checkpoint is kept, the damaged one is not counted
    assert "saved up to step 40" in _saved_up_to(cfg)
    # What is on disk is one training: steps 1..40, nothing of the discarded one's 41..80.
    assert _train_steps(read_records(RunStorage(str(tmp_path), "damaged"))) == list(range(1, 41))
    resumed = train(cfg, "local")
    assert resumed.final == reference.final
    assert _train_steps(resumed.records) == list(range(1, 121))


# -- 6: every storage failure is one line, leaves no litter and loses nothing saved --------------

class _FullDisk:
    """The run's pyarrow filesystem on a disk that fills up: once a path containing `full_at` is
    written, that write stops half way with ENOSPC, and so does every write after it (a full disk
    stays full) until `free()`. Reads, moves and deletes go through untouched."""

    def __init__(self, fs, state: dict):
        self.fs, self.state = fs, state

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open_output_stream(self, path, *args, **kwargs):
        if self.state["full_at"] and self.state["full_at"] in path:
            self.state["full"] = True
        stream = self.fs.open_output_stream(path, *args, **kwargs)
        return _FillingStream(stream, self.state) if self.state["full"] else stream


class _FillingStream:
    def __init__(self, stream, state):
        self.stream, self.state = stream, state

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()

    def write(self, data):
        import errno
        import os

        self.stream.write(data[:len(data) // 2])  # what fitted
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def full_disk(monkeypatch):
    """Set `state["full_at"]` to a path fragment: the disk of every run storage fills there."""
    state = {"full_at": None, "full": False}
    original = RunStorage.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.fs = _FullDisk(self.fs, state)

    monkeypatch.setattr(RunStorage, "__init__", init)
    return state


def _cli_train(tmp_path, capsys, *overrides):
    from codistill.cli import main
    from tests.conftest import REPO

    args = ["train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local", "--set", f"ray.storage_path={tmp_path}",
            "--set", "train.steps=120", "--set", "train.eval_every=40", "--set", "train.checkpoint_every=40"]
    for override in overrides:
        args += ["--set", override]
    code = main(args)
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    return code, err[-1] if err else ""


@pytest.mark.parametrize("full_at", ["step_00000080/peer1.pt", pytest.param("records.parquet", marks=pytest.mark.slow),
                                     # the same class at the other writes: the full tier
                                     *(pytest.param(w, marks=pytest.mark.slow) for w in
                                       ("step_00000080/meta.pt", "records/peer1/00000041", "accuracy.png"))])
def test_a_disk_that_fills_up_mid_run_is_one_line_and_the_run_resumes_once_freed(tmp_path, capsys, full_disk, full_at):
    from codistill.engine.checkpoint import checkpoint_folders, newest_loadable

    code, last = _cli_train(tmp_path, capsys, "name=whole")
    assert code == 0
    reference = read_records(RunStorage(str(tmp_path), "whole"))
    full_disk["full_at"] = full_at
    code, last = _cli_train(tmp_path, capsys, "name=full")
    assert code == 1 and last.startswith("error: cannot write") and "No space left on device" in last, last
    assert str(tmp_path / "full") in last and "saved up to step" in last
    run = tmp_path / "full"
    assert not list(run.rglob("*.tmp"))  # no litter
    assert not (run / "lease.json").exists()
    storage = RunStorage(str(tmp_path), "full")
    newest = newest_loadable(storage, checkpoint_folders(storage), 2)
    assert newest is not None and newest[0] == (40 if "00000080" in full_at or "00000041" in full_at else 120)
    assert f"saved up to step {newest[0]}" in last
    full_disk.update(full_at=None, full=False)  # space freed
    # Never ahead of the newest complete checkpoint: what `report` shows is what a resume keeps.
    assert max(_train_steps(read_records(storage), peer=1)) == newest[0]
    code, _ = _cli_train(tmp_path, capsys, "name=full")
    assert code == 0
    resumed = read_records(storage)
    assert _train_steps(resumed, peer=1) == list(range(1, 121))
    assert _test_rows(resumed) == _test_rows(reference)  # nothing lost, nothing twice


class _ReadOnly:
    """A folder this process may read but not write (the tests run as root, whom chmod does not stop)."""

    def __init__(self, fs):
        self.fs = fs

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def create_dir(self, path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    open_output_stream = move = delete_file = delete_dir = create_dir


@pytest.mark.parametrize("where", ["storage_path", "name", "read_only"])
def test_storage_that_cannot_be_written_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch, where):
    (tmp_path / "afile").write_text("not a folder")
    if where == "read_only":
        original = RunStorage.__init__

        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self.fs = _ReadOnly(self.fs)

        monkeypatch.setattr(RunStorage, "__init__", init)
    overrides = {"storage_path": [f"ray.storage_path={tmp_path / 'afile'}"], "name": ["name=afile"],
                 "read_only": []}[where]
    code, last = _cli_train(tmp_path, capsys, *overrides)
    assert code == 2 and last.startswith("config error: ray.storage_path: ") and str(tmp_path) in last, last
    assert ("Permission denied" if where == "read_only" else "Not a directory") in last
    assert not list(tmp_path.rglob("*.tmp"))


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


# -- 4: a KD student resumes with the teacher it was trained with --------------------------------

@pytest.mark.slow  # > 1.5 s: the full tier
def test_a_student_resumes_with_its_stored_teacher_when_the_teacher_run_has_a_newer_checkpoint(tmp_path):
    import shutil

    from codistill.errors import ConfigError

    def teacher(steps):
        return small_config(tmp_path, "name=wide", f"train.steps={steps}", "peers.0.optimizer.schedule=constant",
                            base="configs/teacher_mnist1d_wide.yaml")

    train(teacher(80), "local")
    student = small_config(tmp_path, "name=student", "teacher.run=wide", base="configs/kd_mnist1d.yaml")
    with pytest.raises(RuntimeError):
        train(student, "local", on_progress=_crash_at(100))
    train(teacher(120), "local")  # the teacher run goes on: its newest checkpoint is now step 120
    resumed = train(student, "local")
    assert resumed.config.teacher.checkpoint.endswith("wide/checkpoints/step_00000080/peer0.pt")
    assert _train_steps(resumed.records) == list(range(1, 121))
    shutil.rmtree(tmp_path / "wide" / "checkpoints" / "step_00000080")
    with pytest.raises(ConfigError) as info:
        train(student, "local")
    assert info.value.path == "teacher.checkpoint" and "step_00000080/peer0.pt" in info.value.message
    assert "trained with" in info.value.message and "\n" not in str(info.value)


# -- 8: SIGTERM (a scheduler stopping the job) is Ctrl-C: say what is saved, release the lease ----

@pytest.mark.slow  # > 4 s: the full tier
def test_sigterm_says_what_is_saved_releases_the_lease_and_exits_143(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    argv = [os.path.join(os.path.dirname(sys.executable), "codistill"), "train", f"{REPO}/configs/dml_mnist1d.yaml",
            "--backend", "local", "--set", f"ray.storage_path={tmp_path}", "--set", "name=stopped",
            "--set", "train.steps=100000", "--set", "train.checkpoint_every=100", "--set", "train.eval_every=100"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    wait_until(lambda: any((tmp_path / "stopped" / "checkpoints").glob("step_*/meta.pt")), "the first checkpoint",
               240, alive=proc, poll=0.5)
    assert (tmp_path / "stopped" / "lease.json").exists()
    proc.send_signal(signal.SIGTERM)
    with phase("stopping after SIGTERM", 120) as limit:
        _, err = proc.communicate(timeout=limit)
    last = err.strip().replace("\r", "\n").splitlines()[-1]
    assert proc.returncode == 143, err[-2000:]
    assert last.startswith("terminated (SIGTERM) at step") and "saved up to step" in last, last
    assert not (tmp_path / "stopped" / "lease.json").exists()  # a retry elsewhere starts at once


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


@pytest.mark.slow  # a real process
def test_ctrl_c_of_born_again_says_what_is_kept_and_exits_130(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    argv = [os.path.join(os.path.dirname(sys.executable), "codistill"), "born-again",
            f"{REPO}/configs/born_again_mnist1d.yaml", "--backend", "local", "--set", f"ray.storage_path={tmp_path}",
            "--set", "name=ba", "--set", "train.steps=100000", "--set", "train.checkpoint_every=100",
            "--set", "train.eval_every=100"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    wait_until(lambda: any(tmp_path.glob("ba-gen0/checkpoints/step_*/meta.pt")), "generation 0's first checkpoint",
               240, alive=proc, poll=0.5)
    proc.send_signal(signal.SIGINT)
    with phase("stopping after Ctrl-C", 120) as limit:
        _, err = proc.communicate(timeout=limit)
    last = err.strip().replace("\r", "\n").splitlines()[-1]
    assert proc.returncode == 130, err[-2000:]
    assert last.startswith("interrupted") and "re-run the same command" in last and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "ba-gen0" / "lease.json").exists()


# -- 10: the private Ray instance listens on the loopback address only ----------------------------

def test_the_private_ray_instance_is_asked_for_the_loopback_address_and_a_cluster_is_not(monkeypatch):
    import os

    import ray
    from ray._private import ray_constants

    from codistill.engine import run

    calls = []

    def init(**kwargs):  # what Ray would start with, seen from inside ray.init
        calls.append((kwargs, ray_constants.ENABLE_RAY_CLUSTER, os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster_before = ray_constants.ENABLE_RAY_CLUSTER
    run.connect_ray(None)
    kwargs, cluster, env = calls[-1]
    assert kwargs["address"] == "local" and kwargs["_node_ip_address"] == "127.0.0.1"
    assert cluster is False and env == "0"  # else Ray (2.60, Linux) swaps 127.0.0.1 for the node's outward address
    assert ray_constants.ENABLE_RAY_CLUSTER == cluster_before  # put back: a later join of a cluster works
    run.connect_ray("10.1.2.3:6379")
    kwargs, cluster, _ = calls[-1]
    assert kwargs["address"] == "10.1.2.3:6379" and "_node_ip_address" not in kwargs and cluster == cluster_before


@pytest.mark.ray
@pytest.mark.slow  # starts its own Ray instance, in a subprocess
def test_the_private_ray_instance_listens_on_loopback_only():
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    script = """
import subprocess, psutil, ray
from codistill.engine.run import connect_ray
connect_ray(None, log_to_driver=False)
session = ray._private.worker._global_node.get_session_dir_path()
pids = {p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"]) if session in " ".join(p.info["cmdline"] or [])}
for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
    if any(f"pid={pid}," in line for pid in pids):
        print("LISTEN", line.split()[3])
ray.shutdown()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=scaled(180),
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    listening = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("LISTEN")]
    assert listening, out.stderr[-2000:]
    assert all(address.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for address in listening), listening


# -- issue 30: user code that exits, is interrupted or leaves a thread; what a refusal leaves ----

def _cli(tmp_path, module_source: str, *args: str, **popen):
    """`python -m codistill.cli <args> --import <a module of module_source>` as a process, the
    module beside it (cwd): (the process, the module's name)."""
    import os
    import subprocess
    import sys
    import uuid

    from tests.conftest import REPO

    module = f"user_module_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(module_source)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": REPO}
    argv = [sys.executable, "-m", "codistill.cli", *args, "--import", module]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                            **popen), module


@pytest.mark.parametrize("exit_call", ["sys.exit(0)", "sys.exit()", "raise SystemExit('bye')"])
def test_a_users_module_that_exits_at_import_is_one_line_exit_2_and_no_run(tmp_path, monkeypatch, capsys, exit_call):
    import uuid

    from codistill.cli import main
    from tests.conftest import REPO

    module = f"user_module_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(f"import sys\n{exit_call}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local", "--import", module,
                 "--set", f"ray.storage_path={tmp_path / 'runs'}"])
    last = _last_err_line(capsys)
    assert code == 2, "a run that never started must not exit 0"
    assert last.startswith(f"config error: imports.0: cannot import {module!r}: it exits at import"), last
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
@pytest.mark.parametrize("sig,code,said", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_in_a_slow_import_is_one_line_without_a_traceback(tmp_path, sig, code, said):
    import signal

    from tests.conftest import REPO

    marker = tmp_path / "importing"
    proc, module = _cli(tmp_path, f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\n"
                                  "while True:  # an import that never ends on its own\n    time.sleep(1)\n",
                        "train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local")
    try:
        wait_until(marker.exists, "the slow import", 60, alive=proc, poll=0.1)
        proc.send_signal(getattr(signal, sig))
        with phase(f"stopping after {sig}", 30) as limit:
            _, err = proc.communicate(timeout=limit)
    finally:
        proc.kill()  # a no-op once it exited
    assert proc.returncode == code, err[-2000:]
    assert err.strip().splitlines() == [f"{said}: while importing {module!r} (imports.0); nothing was run"], err[-2000:]


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_a_thread_user_code_leaves_running_does_not_keep_the_finished_run_from_exiting(tmp_path):
    from tests.conftest import REPO

    proc, _ = _cli(tmp_path, "import threading, time\n"
                             "threading.Thread(target=time.sleep, args=(3600,), name='forever').start()\n",
                   "train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local", "--set", "name=threads",
                   "--set", f"ray.storage_path={tmp_path}", "--set", "train.steps=20", "--set", "train.eval_every=10",
                   "--set", "train.checkpoint_every=10")
    try:
        with phase("a finished run exiting past a thread left running", 60) as limit:
            out, err = proc.communicate(timeout=limit)
    finally:
        proc.kill()  # a no-op once it exited
    assert proc.returncode == 0, err[-2000:]
    assert "note: user code left 1 non-daemon thread running (forever); exiting anyway" in err, err[-2000:]
    assert "records: " in out and "plot:" in out  # printed before the hard exit, and flushed
    assert (tmp_path / "threads" / "records.parquet").exists() and not (tmp_path / "threads" / "lease.json").exists()


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
