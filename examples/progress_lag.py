"""How far `codistill train`'s progress bar trails the real step, measured from outside as a user
sees it: runs the CLI, timestamps every bar update on its stderr, and compares each with the step
peer 0 had really reached then (its records' `time`).

    python examples/progress_lag.py configs/dml_mnist1d.yaml --backend ray
    python examples/progress_lag.py configs/codistill_mnist1d.yaml --backend ray --set train.steps=3000
"""

import bisect
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> None:
    runs, name = tempfile.mkdtemp(prefix="progress-lag-"), f"lag{int(time.time())}"
    command = [os.path.join(os.path.dirname(sys.executable), "codistill"), "train", *argv,
               "--set", f"name={name}", "--set", f"ray.storage_path={runs}"]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    shown, line = [], b""
    while (char := process.stderr.read(1)):
        line += char
        if char in b"\r\n":  # tqdm redraws with \r
            if (match := re.search(rb"\| *(\d+)/\d+ \[", line)):
                shown.append((time.time(), int(match.group(1))))
            line = b""
    if process.wait() != 0:
        sys.exit(f"the run failed (exit {process.returncode})")
    records = pq.read_table(os.path.join(runs, name, "records.parquet")).to_pylist()
    trained = sorted((r["time"], r["step"]) for r in records if r["split"] == "train" and r["peer"] == 0)
    times = [t for t, _ in trained]
    lags = [trained[i - 1][1] - step for t, step in shown if (i := bisect.bisect_right(times, t)) > 0]
    rate = (trained[-1][1] - trained[0][1]) / (trained[-1][0] - trained[0][0])
    print(f"{len(shown)} bar updates; the bar trailed peer 0's step by a median {statistics.median(lags):.0f} "
          f"steps, at most {max(lags)} ({rate:.0f} steps/s)")


if __name__ == "__main__":
    main(sys.argv[1:])
