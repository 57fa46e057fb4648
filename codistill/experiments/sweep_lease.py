"""One driver per sweep name, and what a second driver left behind (`experiments/tune.py`).

A sweep's driver takes the run lease of its folder (`lease.py`, as `train` does for a
run and every cell of a `compare` for its own): a second `codistill tune` on the name is refused
in one line before anything is written. Sweeps run before that lease existed — or a trial whose
run a process that outlived its driver still held — could end a trial in ERROR only because
another process held the trial's run ("… is being written by another process"). Such a trial
failed nothing of its own, so a resume retries it: its state is set back to PENDING before
`Tuner.restore`, which then resumes it under its own trial id (so its run, named by that id,
resumes too); every other errored trial stays as it ended — a re-run is not a retry of a failure.
"""

from __future__ import annotations

import json
import logging

from codistill.lease import HELD_ELSEWHERE, LEASE_FILE, RunLease
from codistill.storage import RunStorage

logger = logging.getLogger(__name__)

STATE_PREFIX = "experiment_state-"
"""Ray Tune's experiment state files in a sweep's folder (one per driver session; the newest
is what `Tuner.restore` reads)."""


def _erred_on_a_lease(storage: RunStorage, trial: dict) -> bool:
    try:
        text = storage.read_bytes(f"{trial['relative_logdir']}/error.txt").decode(errors="replace")
    except (FileNotFoundError, KeyError):
        return False
    lines = text.strip().splitlines()
    return bool(lines) and HELD_ELSEWHERE in lines[-1]  # the last line of a remote traceback is the error


def retry_lease_refusals(storage: RunStorage) -> list[str]:
    """Set the trials of the sweep at `storage` that erred only on another process's lease back
    to PENDING, in every experiment state file; returns their trial ids."""
    retried = []
    for name in storage.list("."):
        if not (name.startswith(STATE_PREFIX) and name.endswith(".json")):
            continue
        state = json.loads(storage.read_bytes(name))
        changed = False
        for entry in state.get("trial_data", []):
            trial, metadata = json.loads(entry[0]), json.loads(entry[1])
            if trial.get("status") != "ERROR" or not _erred_on_a_lease(storage, trial):
                continue
            trial["status"] = "PENDING"
            metadata.update(error_filename=None, pickled_error_filename=None)
            entry[0], entry[1] = json.dumps(trial, indent=2), json.dumps(metadata)
            retried.append(trial["trial_id"])
            changed = True
        if changed:
            storage.write_bytes(name, json.dumps(state).encode())
    if retried:
        logger.warning("retrying %d trial(s) of %s that erred only because another process held their run: %s",
                       len(set(retried)), storage.uri, ", ".join(sorted(set(retried))))
    return sorted(set(retried))


def clear_dead_leases(runs: RunStorage) -> None:
    """A sweep killed with its whole machine can leave a lease in a trial's run that had written
    its results but not yet released it; a resumed sweep never visits that finished trial again,
    so it clears the leases no live process holds (`RunLease.live_holder`)."""
    for name in runs.list("."):
        trial = RunStorage.at(f"{runs.uri}/{name}")
        if trial.exists(LEASE_FILE) and RunLease(trial).live_holder() is None:
            logger.warning("clearing the lease a killed process left in %s", trial.uri)
            trial.delete(LEASE_FILE)
