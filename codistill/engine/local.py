"""The local runner: K peers as threads in one process, exchanging in memory.

The reference the Ray runner must reproduce, and the quickest way to try a method."""

from __future__ import annotations

import logging
import os
import threading

import torch

from codistill.config import ExperimentConfig, to_dict
from codistill.data import load_data
from codistill.engine.checkpoint import LOCAL_CHECKPOINT_DIR, LocalCheckpoints, checkpoint_folders, meta_state
from codistill.engine.job import make_job, peer_schedules
from codistill.engine.loop import RunContext, train_peer
from codistill.engine.resume import local_resume_point
from codistill.engine.threads import run_in_threads
from codistill.exchange import LocalGatherHub, LocalPublications
from codistill.records import drop_records_after, write_record_part
from codistill.storage import RunStorage, StorageError

logger = logging.getLogger(__name__)


class _SharedRun:
    def __init__(self, cfg: ExperimentConfig, storage: RunStorage, on_progress, on_checkpoint):
        self.cfg = cfg
        self.storage = storage
        self.checkpoints = LocalCheckpoints(storage, cfg.train.keep_checkpoints)
        # The newest checkpoint that loads and whose steps the records hold (every part read first).
        found = local_resume_point(storage, checkpoint_folders(storage, [LOCAL_CHECKPOINT_DIR]), cfg.num_peers)
        self.resume_step, self.resume_states = found if found else (None, None)
        self.checkpoints.discard_after(self.resume_step or 0, (
            f"the run resumes from step {self.resume_step}" if self.resume_step else "no checkpoint loads, the run "
            "starts over") + ", so it belongs to a training that is thrown away")
        self.barrier = threading.Barrier(cfg.num_peers)
        self.stop = threading.Event()
        self.on_progress = on_progress
        self.on_checkpoint = on_checkpoint  # told each committed step (the run's tracker writer reads its records)
        self.reports: list[dict] = []


class LocalRunContext(RunContext):
    node = "local"

    def __init__(self, shared: _SharedRun, peer: int):
        self.shared = shared
        self.peer = peer

    def restore(self, peer: int) -> dict | None:
        step = self.shared.resume_step
        # Records of a training that was thrown away (after the checkpoint resumed from, or all of
        # them when none loads) would be stitched to this one's.
        drop_records_after(self.shared.storage, peer, step or 0)
        return None if step is None else self.shared.resume_states[peer]

    def report(self, step: int, metrics: dict, checkpoint: dict | None, records: list[dict]) -> None:
        shared = self.shared
        if checkpoint is not None:
            shared.checkpoints.write_peer(step, self.peer, checkpoint)
            write_record_part(shared.storage, self.peer, records)
        shared.barrier.wait()  # every peer's file is written before the checkpoint is committed
        if self.peer == 0:
            if checkpoint is not None:
                shared.checkpoints.commit(step, meta_state(step, to_dict(shared.cfg)))
                if shared.on_checkpoint:
                    shared.on_checkpoint(step)
            shared.reports.append(metrics)

    def stopping(self) -> bool:
        return self.shared.stop.is_set()

    def progress(self, step: int, metrics: dict) -> None:
        if self.shared.on_progress:
            self.shared.on_progress(step, metrics)


def run_local(cfg: ExperimentConfig, storage: RunStorage, on_progress=None, on_checkpoint=None) -> list[dict]:
    """Train all peers of `cfg` in this process. Returns the metrics reported by peer 0.
    `on_checkpoint(step)` is called once each checkpoint is committed, with every peer's records."""
    data = load_data(cfg.data)
    device = torch.device("cpu")
    shared = _SharedRun(cfg, storage, on_progress, on_checkpoint)
    hub = LocalGatherHub(cfg.num_peers)
    publications = LocalPublications(cfg.num_peers)
    schedules = peer_schedules(cfg, len(data.y_train))
    jobs = [make_job(cfg, k, data, schedules, device, hub.exchange_for(k), publications.exchange_for(k))
            for k in range(cfg.num_peers)]
    errors: list[BaseException] = []

    def run_peer(k: int) -> None:
        try:
            train_peer(jobs[k], LocalRunContext(shared, k), cfg.data.eval_batch_size)
        except threading.BrokenBarrierError:
            pass  # another peer failed first; its error is the one to report
        except BaseException as err:  # noqa: BLE001 — re-raised in the caller's thread
            errors.append(err)
            hub.abort()
            shared.barrier.abort()

    def stop_peers() -> None:
        # Ctrl-C: stop the peers at their next step and release the ones waiting for each other.
        shared.stop.set()
        hub.abort()
        publications.abort()
        shared.barrier.abort()

    try:
        # One intra-op thread per peer when there are enough cores: the same arithmetic as one
        # Ray worker per core, so both runners produce the same numbers.
        run_in_threads(run_peer, cfg.num_peers, torch_threads=(os.cpu_count() or 1) // cfg.num_peers,
                       on_interrupt=stop_peers)
    except KeyboardInterrupt:
        _back_to_newest_checkpoint(shared)
        raise
    if errors:
        _back_to_newest_checkpoint(shared)
        raise errors[0]
    return shared.reports


def _back_to_newest_checkpoint(shared: _SharedRun) -> None:
    """After a failure (a full disk between a peer's records and the commit, a crash, Ctrl-C):
    the run's folder as of its newest complete checkpoint, so what `report` shows is what a
    resume keeps — never records ahead of the checkpoint."""
    complete = shared.checkpoints.complete_steps()
    step = complete[-1] if complete else 0
    try:
        shared.checkpoints.discard_after(step, "not committed when the run stopped (" + (
            f"its newest checkpoint is step {step})" if step else "it has no checkpoint)"))
        for peer in range(shared.cfg.num_peers):
            drop_records_after(shared.storage, peer, step)
    except StorageError as err:  # a resume drops them too; the run's own error is the one to report
        logger.warning("could not tidy %s after the failure: %s", shared.storage.uri, err)
