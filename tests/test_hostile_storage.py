"""Faults of storage and of stopping a run (issue 24): nothing lost, nothing twice, no litter, and
every failure one line — a damaged or full disk, storage that cannot be written, a KD student's
teacher run going on, SIGTERM."""

from __future__ import annotations

import pytest

from codistill.engine.run import train
from codistill.records import read_records
from codistill.storage import RunStorage
from tests.conftest import phase, small_config, wait_until


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


@pytest.mark.slow
@pytest.mark.parametrize("full_at", ["step_00000080/peer1.pt", "records.parquet", "step_00000080/meta.pt",
                                     "records/peer1/00000041", "accuracy.png"])
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
