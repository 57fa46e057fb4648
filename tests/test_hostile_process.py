"""What a process meets (issues 24 and 30): Ctrl-C and SIGTERM, user code that exits, hangs in its
import or leaves a thread running, and the private Ray instance listening on loopback only."""

from __future__ import annotations

import pytest

from tests.conftest import phase, scaled, wait_until
from tests.test_hostile_inputs import _last_err_line


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

    from codistill.engine.ray import connect as run

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
from codistill.engine.ray.connect import connect_ray
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
