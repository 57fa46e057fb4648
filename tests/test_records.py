"""A run's records (the local runner): a damaged record part is one line naming it — in `report`
and before a resume trains anything — and `report` says when a run has not finished."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from codistill.cli import main
from codistill.engine.run import train, train_connected
from codistill.records import RecordsError
from tests.conftest import small_config

PART = "records/peer1/00000041-00000080.parquet"


def _crash_at(limit: int):
    def crash(step, metrics):
        if step >= limit:
            raise RuntimeError("simulated crash")
    return crash


def _damage(path, how: str) -> bytes:
    before = path.read_bytes()
    path.write_bytes(before[:len(before) // 2] if how == "truncated" else b"")
    return before


def _train_steps(table, peer: int) -> list[int]:
    return [r["step"] for r in table.to_pylist() if r["split"] == "train" and r["peer"] == peer]


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_report_names_a_damaged_part_in_one_line_and_exits_2(tmp_path, capsys):
    train(small_config(tmp_path, "name=run"), "local")
    for how in ("truncated", "empty"):
        good = _damage(tmp_path / "run" / PART, how)
        capsys.readouterr()
        assert main(["report", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"error: {tmp_path}/run/{PART} is damaged (")
        (tmp_path / "run" / PART).write_bytes(good)


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_a_resume_sets_a_damaged_part_aside_and_retrains_its_steps_or_refuses_before_training(tmp_path, caplog):
    reference = train(small_config(tmp_path, "name=whole"), "local")
    cfg = small_config(tmp_path, "name=run")
    with pytest.raises(RuntimeError):  # checkpoints at 40 and 80, then the crash
        train(cfg, "local", on_progress=_crash_at(100))
    run, seen = tmp_path / "run", []

    # The first part damaged: no checkpoint before it is kept (40 and 80 are), so nothing trains.
    first = run / "records/peer0/00000001-00000040.parquet"
    good = _damage(first, "truncated")
    with pytest.raises(RecordsError) as info:
        train(cfg, "local", on_progress=lambda step, metrics: seen.append(step))
    message = str(info.value)
    assert f"{first} is damaged" in message and "no checkpoint before step 1 is kept" in message and "\n" not in message
    assert not seen and first.exists() and not list(run.glob("records/*/*.damaged"))  # nothing trained, nothing moved
    first.write_bytes(good)

    # The newest part damaged: set aside, and steps 41..80 trained again from the checkpoint at 40.
    _damage(run / PART, "empty")
    resumed = train(cfg, "local", on_progress=lambda step, metrics: seen.append(step))
    assert (run / f"{PART}.damaged").read_bytes() == b""  # kept, not deleted
    assert f"{run}/{PART} is damaged" in caplog.text and "the run resumes from step 40" in caplog.text
    assert 40 < seen[0] <= 50
    assert resumed.final == reference.final  # nothing lost, nothing twice
    for peer in (0, 1):
        assert _train_steps(resumed.records, peer) == list(range(1, 121))
    assert main(["report", str(run)]) == 0


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_a_ray_resume_past_a_damaged_part_is_refused_before_training(tmp_path):
    cfg = small_config(tmp_path, "name=run")
    train(cfg, "local")
    run = tmp_path / "run"
    for folder in (run / "checkpoints").iterdir():  # where Ray Train keeps a run's checkpoints
        folder.rename(run / folder.name)
    _damage(run / PART, "truncated")
    with pytest.raises(RecordsError, match=f"{run}/{PART} is damaged .* a Ray run resumes only from its newest "
                                           r"checkpoint \(step 120\)"):
        train_connected(cfg, "ray")  # refused before Ray is needed
    assert (run / PART).exists()


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_report_says_when_a_run_has_not_finished_and_nothing_more_when_it_has(tmp_path, capsys):
    finished = train(small_config(tmp_path, "name=done"), "local")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "done")]) == 0
    assert capsys.readouterr().out.startswith(finished.summary + "\nplot: ")

    with pytest.raises(RuntimeError):  # stopped: checkpoints at 40 and 80, then the crash
        train(small_config(tmp_path, "name=stopped"), "local", on_progress=_crash_at(100))
    assert main(["report", str(tmp_path / "stopped")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("not finished (stopped): its records reach step 80 of 120 (train.steps); the run is saved "
                        "up to step 80 (its newest checkpoint); re-run its train command to resume")
    assert lines[1] == "last evaluation at step 80"

    # A live writer (this process, as the lease of a run in progress names it).
    lease = {"host": socket.gethostname(), "pid": os.getpid(), "token": "theirs", "started": "now",
             "renewed": time.time()}
    (tmp_path / "stopped" / "lease.json").write_text(json.dumps(lease))
    assert main(["report", str(tmp_path / "stopped")]) == 0
    assert capsys.readouterr().out.startswith(f"not finished (running: host {socket.gethostname()}, "
                                              f"pid {os.getpid()}): its records reach step 80 of 120")
