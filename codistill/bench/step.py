"""`codistill bench step`: where a training step of a config goes, for each precision and data
path, measured side by side.

The config's K peers train as threads (the local runner's way), one variant at a time in
rotating blocks: fp32 and bf16, each with the data on the CPU (batches cut there and copied) or
on the device (`train.data_on_device`). Each step is the loop's own `train_step`, timed by its
parts (data, forward incl. the loss, exchange incl. waiting for the other peers, backward,
optimizer; on a GPU the clock waits for the device at each part). Reported per variant:
samples/s per peer, the median step, its parts, and its step time ÷ the fp32/CPU-data one as
the median of paired block ratios with a bootstrap interval."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import threading
import time

import torch

from codistill.bench.common import DEMO_CONFIG, paired_ratio, ratio_text, write_json
from codistill.config import load_config
from codistill.data import load_data
from codistill.engine.job import make_job, peer_schedules
from codistill.engine.loop import train_step
from codistill.engine.threads import raise_first_error, run_in_threads
from codistill.exchange import LocalGatherHub, LocalPublications

VARIANTS = {"fp32, data on cpu": ("fp32", False), "fp32, data on device": ("fp32", True),
            "bf16, data on cpu": ("bf16", False), "bf16, data on device": ("bf16", True)}
PARTS = ("data_ms", "forward_ms", "exchange_ms", "backward_ms", "optimizer_ms")


def _jobs(cfg, device: torch.device) -> dict[str, list]:
    data = load_data(cfg.data)
    jobs = {}
    for name, (precision, on_device) in VARIANTS.items():
        variant = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision,
                                                                      data_on_device=on_device))
        hub, publications = LocalGatherHub(cfg.num_peers), LocalPublications(cfg.num_peers)
        schedules = peer_schedules(variant, len(data.y_train))
        jobs[name] = [dataclasses.replace(make_job(variant, k, data, schedules, device, hub.exchange_for(k),
                                                   publications.exchange_for(k)), sync_timing=True)
                      for k in range(cfg.num_peers)]
    return jobs


def _run(jobs: dict[str, list], rounds: int, block: int) -> dict[str, dict]:
    """Peer 0's block times and records per variant (every peer steps; they exchange as in a run)."""
    out = {name: {"blocks": [], "records": []} for name in jobs}
    names = list(jobs)
    num_peers = len(next(iter(jobs.values())))
    barrier = threading.Barrier(num_peers)

    def run(k: int) -> None:
        step = 0
        for name in names:  # warm-up: allocator, mixed-precision caches, first exchange
            for _ in range(2):
                train_step(jobs[name][k], step)
                step += 1
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                barrier.wait()
                spent = 0.0
                for _ in range(block):
                    started = time.perf_counter()
                    record = train_step(jobs[name][k], step)
                    spent += time.perf_counter() - started
                    step += 1
                    if k == 0:
                        out[name]["records"].append(record)
                if k == 0:
                    out[name]["blocks"].append(spent / block)

    raise_first_error(run_in_threads(run, num_peers, torch_threads=torch.get_num_threads() // num_peers))
    return out


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config or DEMO_CONFIG, list(args.set or []))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = ", ".join(sorted({p.model for p in cfg.peers}))
    print(f"# codistill bench step — {cfg.num_peers} × {models}, method {cfg.method.name}, data {cfg.data.name}, "
          f"batch {cfg.data.batch_size}, on {device.type}; {args.rounds} rounds of one block of {args.block} steps "
          "per variant, order rotating", flush=True)
    measured = _run(_jobs(cfg, device), args.rounds, args.block)
    base = measured["fp32, data on cpu"]["blocks"]
    figures = {"config": args.config or DEMO_CONFIG, "device": device.type, "batch_size": cfg.data.batch_size,
               "variants": {}}
    for name, got in measured.items():
        step_s = statistics.median(got["blocks"])
        figures["variants"][name] = {
            "step_ms": 1000 * step_s, "samples_per_s_per_peer": cfg.data.batch_size / step_s,
            "parts_ms": {part: statistics.median(r.get(part, 0.0) for r in got["records"]) for part in PARTS},
            "over_fp32_cpu_data": paired_ratio(base, got["blocks"]),
        }
    print(f"\n{'variant':<22}{'samples/s':>10}{'step':>10}   {'÷ fp32, data on cpu [95% CI]':<28}"
          + "".join(f"{p[:-3]:>10}" for p in PARTS) + "   (median ms)")
    for name, row in figures["variants"].items():
        print(f"{name:<22}{row['samples_per_s_per_peer']:>10.0f}{row['step_ms']:>8.2f}ms   "
              f"{ratio_text(row['over_fp32_cpu_data']):<28}" + "".join(f"{row['parts_ms'][p]:>10.2f}" for p in PARTS))
    write_json(args.out, figures)
    return 0
