"""Runs that never lie and never corrupt each other (the local runner; Ray in test_ray_runner):
divergence, stray and missing files, one-line errors."""

import threading

import pytest
import torch

from codistill.cli import main
from codistill.engine.checkpoint import LocalCheckpoints
from codistill.engine.loop import NonFiniteLoss
from codistill.engine.run import train
from codistill.records import RecordsError
from tests.conftest import REPO, phase, scaled, small_config, wait_until

DIVERGES = ["train.steps=400", "train.eval_every=20", "train.checkpoint_every=5", "train.keep_checkpoints=2",
            "peers.*.optimizer={name: sgd, lr: 30, warmup_steps: 400}"]


def test_divergence_stops_the_run_naming_peer_step_and_term_and_keeps_the_good_checkpoints(tmp_path):
    with pytest.raises(NonFiniteLoss) as info:
        train(small_config(tmp_path, "name=nan", *DIVERGES), "local")
    message = str(info.value)
    assert "diverged" in message and ("'ce' is nan" in message or "'kl' is nan" in message) and "skip_step" in message
    step = int(message.split(" at step ")[1].split(".")[0])
    checkpoints = LocalCheckpoints(__import__("codistill.storage", fromlist=["RunStorage"]).RunStorage(str(tmp_path), "nan"), 2)
    kept = checkpoints.complete_steps()
    assert kept and max(kept) < step  # nothing at or after the divergence was saved...
    for peer in (0, 1):  # ...and what was saved is good
        state = checkpoints.load_peer(max(kept), peer)
        assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_the_cli_says_so_in_one_line_with_exit_1(tmp_path, capsys):
    args = ["train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local", "--set", f"ray.storage_path={tmp_path}"]
    for override in DIVERGES:
        args += ["--set", override]
    assert main(args) == 1
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]  # after the progress bar's lines
    assert last.startswith("error: peer") and "diverged" in last


def test_skip_step_drops_the_bad_steps_and_says_so(tmp_path, monkeypatch):
    from codistill.methods.dml import DML

    original = DML.loss

    def nan_now_and_then(self, s):
        loss, terms = original(self, s)
        if s.step in (3, 7) and threading.current_thread().name == "peer1":
            loss = loss * float("nan")
        return loss, terms

    monkeypatch.setattr(DML, "loss", nan_now_and_then)
    result = train(small_config(tmp_path, "name=skip", "train.on_nonfinite=skip_step"), "local")
    skipped = [(r["peer"], r["step"]) for r in result.records.to_pylist() if r.get("skipped")]
    assert skipped == [(1, 4), (1, 8)]  # the record of update number step + 1
    assert result.final["step"] == 120 and min(result.final["peer_accuracy"]) > 0.3
    assert "2 step(s) skipped" in result.summary


@pytest.mark.slow
def test_stray_files_are_ignored_and_missing_or_overlapping_parts_are_named(tmp_path):
    cfg = small_config(tmp_path, "name=stray")
    first = train(cfg, "local")
    run = tmp_path / "stray"
    (run / "records" / "peer0" / "notes.txt").write_text("mine")
    (run / "records" / "peer0" / "00000001-00000040 (copy).parquet").write_bytes(b"x")
    (run / "checkpoints" / "step_latest").mkdir()
    (run / "checkpoints" / "step_latest" / "meta.pt").write_bytes(b"x")
    again = train(cfg, "local")  # a finished run resumes, ignoring what is not its own
    assert again.records.num_rows == first.records.num_rows
    parts = sorted((run / "records" / "peer0").glob("0*-*.parquet"))
    part = [p for p in parts if "copy" not in p.name][1]
    overlap = run / "records" / "peer0" / f"{part.name[:9]}{int(part.name[9:17]) + 5:08d}.parquet"
    overlap.write_bytes(part.read_bytes())  # a part named as if it covered more steps: an overlap
    with pytest.raises(RecordsError, match="covers steps .* an earlier part covers too"):
        train(cfg, "local")
    overlap.unlink()
    moved = part.rename(tmp_path / part.name)  # a part gone: a gap
    with pytest.raises(RecordsError, match=r"steps 41\.\.80 are missing"):
        train(cfg, "local")
    moved.rename(part)
    assert main(["report", str(run)]) == 0


@pytest.mark.slow  # two real processes, long enough to overlap
def test_two_starts_of_one_run_name_at_once_one_runs_and_the_other_is_refused(tmp_path):
    import os
    import subprocess
    import sys

    argv = [sys.executable, "-m", "codistill.cli", "train", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local",
            "--set", f"ray.storage_path={tmp_path}", "--set", "name=twice", "--set", "train.steps=2000",
            "--set", "train.eval_every=500"]  # long enough that the two surely overlap on a busy machine
    first = subprocess.Popen([*argv, "--set", "train.checkpoint_every=500"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO)
    second = subprocess.Popen([*argv, "--set", "train.checkpoint_every=250"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO)
    outcomes = [(p.wait(timeout=scaled(300)), p.stderr.read()) for p in (first, second)]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 1], outcomes
    refused = next(err for code, err in outcomes if code == 1).strip().splitlines()[-1]
    assert "is being written by another process" in refused and "pid" in refused and "host" in refused
    from codistill.records import read_records
    from codistill.storage import RunStorage

    rows = read_records(RunStorage(str(tmp_path), "twice")).to_pylist()
    steps = [(r["step"], r["peer"]) for r in rows if r["split"] == "train"]
    assert len(steps) == len(set(steps)) == 4000  # each step of each peer once
    assert not (tmp_path / "twice" / "lease.json").exists()  # released at the end
    assert os.path.exists(tmp_path / "twice" / "records.parquet")


def test_a_stale_lease_is_taken_over_and_a_live_one_is_not(tmp_path, monkeypatch):
    import json
    import time

    from codistill import lease as lease_module

    monkeypatch.setattr(lease_module, "SETTLE_S", 0.01)
    cfg = small_config(tmp_path, "name=leased", "train.steps=20", "train.eval_every=10", "train.checkpoint_every=10")
    (tmp_path / "leased").mkdir()
    lease_file = tmp_path / "leased" / "lease.json"
    live = {"host": "another-host", "pid": 1, "token": "theirs", "started": "earlier", "renewed": time.time()}
    lease_file.write_text(json.dumps(live))
    with pytest.raises(lease_module.RunLocked, match="another-host"):
        train(cfg, "local")
    assert not (tmp_path / "leased" / "config.yaml").exists()  # refused before anything was written
    lease_file.write_text(json.dumps({**live, "renewed": time.time() - 2 * lease_module.TTL_S}))  # not renewed
    assert train(cfg, "local").final["step"] == 20
    import socket

    dead = {**live, "host": socket.gethostname(), "pid": 2**22 + 12345, "renewed": time.time()}  # kill -9'd here
    lease_file.write_text(json.dumps(dead))
    assert train(cfg, "local").final["step"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(tmp_path, caplog, damage):
    reference = train(small_config(tmp_path, "name=whole"), "local")

    def crash(step, metrics):
        if step >= 100:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):  # checkpoints at 40 and 80, then the crash
        train(small_config(tmp_path, "name=damaged"), "local", on_progress=crash)
    newest = tmp_path / "damaged" / "checkpoints" / "step_00000080" / "peer1.pt"
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[:100])
    elif damage == "garbage":
        newest.write_bytes(b"\x00not a checkpoint" * 50)
    else:
        newest.unlink()
    damaged = newest.read_bytes() if newest.exists() else None
    resumed = train(small_config(tmp_path, "name=damaged"), "local")
    assert "skipping the checkpoint at step 80" in caplog.text and "weights_only=False" not in caplog.text
    assert resumed.final == reference.final  # resumed from step 40: nothing lost, nothing twice
    steps = [r["step"] for r in resumed.records.to_pylist() if r["split"] == "train" and r["peer"] == 0]
    assert steps == list(range(1, 121))
    # The checkpoint that did not load is moved aside, never deleted (it may be good after all).
    (aside,) = (tmp_path / "damaged" / "set_aside").iterdir()
    assert aside.name.startswith("step_00000080-") and (aside / "meta.pt").exists()
    assert (aside / "peer1.pt").read_bytes() == damaged if damaged is not None else not (aside / "peer1.pt").exists()


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_a_checkpoint_read_that_fails_once_is_tried_again_not_skipped(tmp_path, caplog, monkeypatch):
    """On object storage a read can fail for a moment: a good checkpoint is not lost to it."""
    from codistill.storage import RunStorage

    def crash(step, metrics):
        if step >= 100:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):  # checkpoints at 40 and 80, then the crash
        train(small_config(tmp_path, "name=flaky"), "local", on_progress=crash)
    read, failed = RunStorage.read_bytes, []

    def read_once_failing(self, relative):
        if relative.endswith("step_00000080/peer1.pt") and not failed:
            failed.append(relative)
            raise OSError("connection reset by peer")
        return read(self, relative)

    monkeypatch.setattr(RunStorage, "read_bytes", read_once_failing)
    resumed = train(small_config(tmp_path, "name=flaky"), "local")
    assert failed and "skipping the checkpoint" not in caplog.text
    assert not (tmp_path / "flaky" / "set_aside").exists()
    first = [r["step"] for r in resumed.records.to_pylist() if r["split"] == "train" and r["peer"] == 0 and r.get("resumed")]
    assert first == [81]  # resumed from the step-80 checkpoint that failed to read once


@pytest.mark.parametrize("backend", [pytest.param("local", marks=pytest.mark.slow),  # a real subprocess, ~5 s
                                     pytest.param("ray", marks=pytest.mark.ray)])
def test_ctrl_c_says_where_the_run_stands_and_how_to_resume(tmp_path, backend):
    import os
    import signal
    import subprocess
    import sys

    argv = [os.path.join(os.path.dirname(sys.executable), "codistill"), "train", f"{REPO}/configs/dml_mnist1d.yaml",
            "--backend", backend, "--set", f"ray.storage_path={tmp_path}", "--set", "name=stopped",
            "--set", "train.steps=100000", "--set", "train.checkpoint_every=100", "--set", "train.eval_every=100"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    checkpoints = tmp_path / "stopped" / ("checkpoints" if backend == "local" else "")
    wait_until(lambda: any(checkpoints.glob("step_*/meta.pt")), "the first checkpoint", 240, alive=proc, poll=0.5)
    proc.send_signal(signal.SIGINT)
    with phase("stopping after Ctrl-C", 120) as limit:
        _, err = proc.communicate(timeout=limit)
    last = err.strip().replace("\r", "\n").splitlines()[-1]
    assert proc.returncode == 130, err[-2000:]
    assert last.startswith("interrupted at step") and "saved up to step" in last and "re-run the same command" in last
