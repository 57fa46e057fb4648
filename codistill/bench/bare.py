"""`codistill bench bare`: what the framework costs per step over bare PyTorch doing the same.

The demo's DML (two MNIST-1D CNNs, batch 100, Adam with a cosine rate, T = 3) trained two ways,
side by side in one run, in alternating blocks of steps:

- **framework**: the loop's own per-step path (`engine.loop.PeerLoop.step`: `train_step` —
  batch schedule, `Signals`, taps, signal sources, the method's loss, the exchange, timing —
  plus the record, the divergence watch and progress), on a job built by `make_job`;
- **bare**: `BareDML` below, a plain PyTorch loop of the same models on the same data doing the
  same loss, with no codistill code in its step (the model is built by the registry, once).

Reported as framework ÷ bare, the median of paired block ratios with a 95% bootstrap interval,
on the local runner (peers as threads) and in Ray Train workers (the collective transport
against a bare `torch.distributed.all_gather`). PyTorch Lightning keeps such a parity benchmark
against plain PyTorch for the same reason: the framework's cost is paid on every step.
"""

from __future__ import annotations

import argparse
import math
import statistics
import threading
import time

import torch
import torch.nn.functional as F

from codistill.bench.common import DEMO_CONFIG, paired_ratio, ratio_text, write_json
from codistill.config import load_config
from codistill.data import load_dataset
from codistill.engine.job import make_job, peer_schedules
from codistill.engine.loop import PeerLoop, RunContext
from codistill.engine.threads import raise_first_error, run_in_threads
from codistill.exchange import LocalGatherHub
from codistill.models import create_model

# Long enough that no block reaches an evaluation or a checkpoint: a step, not a run, is timed.
NO_EVALUATION = ["train.steps=1000000", "train.eval_every=1000000", "train.checkpoint_every=0"]


class BareDML:
    """One peer of the demo's DML in plain PyTorch. `gather(logits)` returns every peer's
    logits (detached), this peer's included, in peer order. Every peer draws the same batches
    (one seed): mutual learning compares predictions on the same examples."""

    def __init__(self, peer: int, num_peers: int, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int, lr: float, steps: int, temperature: float, weight: float, gather, seed: int):
        self.peer, self.num_peers, self.model = peer, num_peers, model
        self.x, self.y, self.batch_size = x, y, batch_size
        self.lr, self.steps, self.temperature, self.weight = lr, steps, temperature, weight
        self.gather = gather
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.at = torch.randperm(len(y), generator=self.generator), 0

    def step(self, step: int) -> torch.Tensor:
        if self.at + self.batch_size > len(self.order):  # a new epoch
            self.order, self.at = torch.randperm(len(self.y), generator=self.generator), 0
        index = self.order[self.at:self.at + self.batch_size]
        self.at += self.batch_size
        x, y = self.x[index], self.y[index]
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * step / self.steps))
        logits = self.model(x)
        everyone = self.gather(logits.detach())
        t = self.temperature
        log_p = F.log_softmax(logits / t, dim=-1)
        kl = sum(F.kl_div(log_p, F.softmax(z / t, dim=-1), reduction="batchmean")
                 for k, z in enumerate(everyone) if k != self.peer) / (self.num_peers - 1)
        loss = F.cross_entropy(logits, y) + self.weight * t * t * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


class ThreadGather:
    """A bare all-gather between threads: a list and a barrier."""

    def __init__(self, num_peers: int):
        self.slots: list = [None] * num_peers
        self.barrier = threading.Barrier(num_peers)

    def for_peer(self, peer: int):
        def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
            self.slots[peer] = tensor
            self.barrier.wait()
            everyone = list(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before every peer has read them all
            return everyone
        return gather


def distributed_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist

    everyone = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, tensor.contiguous())
    return everyone


def _arms(spec: dict, peer: int, device: torch.device, exchange, gather) -> dict:
    """The framework's and the bare loop's step functions for peer `peer`, same initial weights."""
    cfg = load_config(spec["config"], spec["overrides"])
    data = load_dataset(cfg.data.name, augment=False)
    job = make_job(cfg, peer, data, peer_schedules(cfg, len(data.y_train)), device, exchange)
    loop = PeerLoop(job, RunContext(), start=0, resumed=False)
    # The bare loop's data: every training example prepared once, outside any step.
    x, y = data.train_batch(torch.arange(len(data.y_train)), torch.Generator())
    spec_peer, method = cfg.peers[peer], cfg.method
    model = create_model(spec_peer.model, data.num_classes, **spec_peer.model_args).to(device)
    model.load_state_dict(job.peer.base.state_dict())
    bare = BareDML(peer, cfg.num_peers, model, x.to(device), y.to(device), cfg.data.batch_size, spec_peer.optimizer.lr,
                   spec["steps"], method.temperature, method.weight, gather, cfg.seed)  # one batch order for all
    return {"framework": loop.step, "bare": bare.step}


def time_arms(arms: dict, rounds: int, block: int) -> dict[str, list[float]]:
    """Per round one block of `block` steps of each arm, the order alternating (ABBA...); a
    block's time is its steps' mean (s). Every peer runs the same order, so peers exchange
    within one arm."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    step = 0
    for name in names:  # warm-up: allocator, thread pools, first collective
        for _ in range(3):
            arms[name](step)
            step += 1
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            started = time.perf_counter()
            for _ in range(block):
                arms[name](step)
                step += 1
            times[name].append((time.perf_counter() - started) / block)
    return times


def _local(spec: dict) -> dict[str, list[float]]:
    peers = spec["peers"]
    hub, gather = LocalGatherHub(peers), ThreadGather(peers)
    arms = [_arms(spec, k, torch.device("cpu"), hub.exchange_for(k), gather.for_peer(k)) for k in range(peers)]
    results = run_in_threads(lambda k: time_arms(arms[k], spec["rounds"], spec["block"]), peers, torch_threads=1)
    raise_first_error(results)
    return results[0]


def _ray_worker(rank: int, device: torch.device, spec: dict) -> dict:
    from codistill.exchange.collective import CollectiveExchange

    torch.set_num_threads(1)
    exchange = CollectiveExchange(rank, spec["peers"], None, device)
    return time_arms(_arms(spec, rank, device, exchange, distributed_gather), spec["rounds"], spec["block"])


def summarise(times: dict[str, list[float]]) -> dict:
    return {"framework_ms": 1000 * statistics.median(times["framework"]),
            "bare_ms": 1000 * statistics.median(times["bare"]),
            "framework_over_bare": paired_ratio(times["bare"], times["framework"])}


def main(args: argparse.Namespace) -> int:
    from codistill.engine.ray.workers import run_on_workers
    from codistill.engine.ray.connect import connect_ray, disconnect_ray

    overrides = [*NO_EVALUATION, *(args.set or [])]
    spec = {"config": args.config or DEMO_CONFIG, "overrides": overrides, "peers": 2, "rounds": args.rounds,
            "block": args.block, "steps": 1_000_000}
    print(f"# codistill bench bare — the demo's DML, framework step vs a bare PyTorch step, {args.rounds} rounds "
          f"of one block of {args.block} steps per arm, order alternating", flush=True)
    figures = {"local": summarise(_local(spec))}
    connect_ray(None)
    figures["ray_collective"] = summarise(run_on_workers(_ray_worker, spec, spec["peers"]))
    disconnect_ray()
    print("\nstep time, median block    bare      framework   framework ÷ bare [95% CI]")
    for runner, row in figures.items():
        print(f"  {runner:<22}{row['bare_ms']:>7.2f} ms{row['framework_ms']:>9.2f} ms"
              f"   {ratio_text(row['framework_over_bare']):>24}")
    write_json(args.out, figures)
    return 0
