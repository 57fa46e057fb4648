"""A local MLflow tracking server on 127.0.0.1 (a SQLite store in a folder): what `codistill bench
tracking` sends to, and the tests' server. The project itself needs only MLflow's client
(`mlflow-skinny`); the server is the full `mlflow` package, which pins pyarrow below the project's,
so it lives in a venv of its own (`make test` makes `.venv-mlflow`; or CODISTILL_MLFLOW_SERVER)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request

from codistill.bench.common import REPO


def server_command() -> str | None:
    """The `mlflow` command of a full MLflow install: CODISTILL_MLFLOW_SERVER, else .venv-mlflow's."""
    found = os.environ.get("CODISTILL_MLFLOW_SERVER") or os.path.join(REPO, ".venv-mlflow", "bin", "mlflow")
    return found if os.access(found, os.X_OK) else None


def _healthy(uri: str) -> bool:
    try:
        return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(folder: str, command: str, start_s: float = 90.0, nice: bool = False):
    """An MLflow server storing into `folder` for the block's length; yields its URI. Its first
    start migrates the SQLite store, which takes seconds: it waits up to `start_s` for /health.
    `nice`: at nice 19 (its workers too), standing in for a server on another machine, whose CPU a
    run's steps do not share. Not in Linux's idle class: on a machine busy with other work it
    then never started."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with open(os.path.join(folder, "server.log"), "w") as log:
        lowest = ["nice", "-n", "19"] if nice else []
        server = subprocess.Popen([*lowest, command, "server", "--host", "127.0.0.1",
                                   "--port", str(port), "--workers", "1",
                                   "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                                   "--artifacts-destination", os.path.join(folder, "artifacts")],
                                  stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + start_s
            while not _healthy(uri):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the MLflow server did not start (exit {server.poll()}): see "
                                       f"{folder}/server.log")
                time.sleep(0.5)
            yield uri
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
