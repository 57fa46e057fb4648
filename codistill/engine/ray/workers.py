"""Run a function in Ray Train workers, the same workers the Ray runner trains in: how the
benchmarks measure a step or an exchange where it really runs (not a training run: no
checkpoints, no records)."""

from __future__ import annotations

import functools
import tempfile

import ray
import ray.train
import ray.train.torch
from ray.train.torch import TorchTrainer

from codistill.engine.ray.runner import ProgressMailbox


def _worker_of(fn, spec: dict, mailbox) -> None:
    rank = ray.train.get_context().get_world_rank()
    result = fn(rank, ray.train.torch.get_device(), spec)
    if rank == 0:  # Train V2 keeps only metrics reported with a checkpoint: hand the result over directly
        ray.get(mailbox.post.remote(1, result))


def run_on_workers(fn, spec: dict, num_workers: int) -> dict:
    """Run `fn(rank, device, spec)` in `num_workers` Ray Train workers (one CPU each, a process
    group among them) and return rank 0's result: the benchmarks' way to measure inside the
    same workers the Ray runner uses."""
    mailbox = ProgressMailbox.remote()
    with tempfile.TemporaryDirectory() as storage:
        TorchTrainer(functools.partial(_worker_of, fn, spec, mailbox),
                     scaling_config=ray.train.ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": 1}),
                     run_config=ray.train.RunConfig(name="bench", storage_path=storage)).fit()
    result = ray.get(mailbox.get.remote())[1]
    ray.kill(mailbox)
    return result
