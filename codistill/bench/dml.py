"""`codistill bench dml`: where the cost of mutual learning goes, measured side by side.

Every figure is a ratio or a distribution measured in one run, with the two things compared
interleaved in alternating blocks, because the machine is shared and noisy:

1. step time of DML ÷ step time of independent training, same peers,
   same runner (local threads, and Ray Train workers with the collective transport): the
   median of paired block ratios with a bootstrap interval;
2. wall time of K peers on Ray ÷ the same K peers in one process (a short demo run);
3. exchange latency p50/p90 per transport for a B×C float32 payload.

Each step is timed by `engine.loop.train_step`, the loop's own step function, on jobs built by
`make_job`, as every runner builds them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from codistill.bench.common import DEMO_CONFIG, latency_row, paired_ratio, print_latencies, ratio_text, write_json
from codistill.config import load_config
from codistill.data import load_dataset
from codistill.engine.job import PeerJob, make_job, peer_schedules
from codistill.engine.loop import train_step
from codistill.engine.threads import raise_first_error, run_in_threads
from codistill.exchange import Exchange, LocalGatherHub
from codistill.models import MODELS


ARMS = {"independent": {"name": "independent"}, "dml": {"name": "dml", "temperature": 3.0}}


def bench_jobs(spec: dict, peer_index: int, device: torch.device, exchange: Exchange) -> dict[str, PeerJob]:
    """The same peer (same initial weights) as an independent job and a DML job."""
    data = load_dataset(spec["config"]["data"]["name"], augment=True)
    jobs = {}
    for name, method in ARMS.items():
        cfg = load_config({**spec["config"], "method": method})
        jobs[name] = make_job(cfg, peer_index, data, peer_schedules(cfg, len(data.y_train)), device, exchange)
    return jobs


def time_methods(jobs: dict[str, PeerJob], rounds: int, block: int) -> dict[str, list[float]]:
    """Per round, one block of `block` steps of each arm, the order rotating from round to
    round (so no arm always follows another); a block's time is its steps' mean (s). Returns
    each arm's block times, and the DML arms' exchange time per block (incl. waiting)."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    times.update({f"{name}_exchange": [] for name in jobs if name != "independent"})
    step = 0
    for name in jobs:  # warm-up: allocator, thread pools, first collective
        train_step(jobs[name], step)
        step += 1
    names = list(jobs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            spent, exchange = 0.0, 0.0
            for _ in range(block):
                started = time.perf_counter()
                record = train_step(jobs[name], step)
                spent += time.perf_counter() - started
                exchange += record["exchange_ms"] / 1000
                step += 1
            times[name].append(spent / block)
            if name != "independent":
                times[f"{name}_exchange"].append(exchange / block)
    return times


def time_exchange(exchange: Exchange, shape: tuple[int, int], calls: int) -> list[float]:
    payload = {"logits": torch.randn(*shape)}
    for _ in range(5):
        exchange.all_gather(payload)
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        exchange.all_gather(payload)
        latencies.append(time.perf_counter() - started)
    return latencies


def _ray_bench_worker(rank: int, device: torch.device, spec: dict) -> dict:
    from codistill.exchange.collective import CollectiveExchange
    from codistill.exchange.object_store import ObjectStoreExchange

    torch.set_num_threads(1)
    collective = CollectiveExchange(rank, spec["peers"], None, device)
    steps = time_methods(bench_jobs(spec, rank, device, collective), spec["rounds"], spec["block"])
    latency = {
        "collective": time_exchange(collective, spec["payload"], spec["latency_calls"]),
        "object_store": time_exchange(ObjectStoreExchange(spec["coordinator"], rank, spec["peers"]),
                                      spec["payload"], spec["latency_calls"]),
    }
    return {"steps": steps, "latency": latency}


def _local_bench(spec: dict) -> tuple[dict, list[float]]:
    hub = LocalGatherHub(spec["peers"])
    exchanges = [hub.exchange_for(k) for k in range(spec["peers"])]
    jobs = [bench_jobs(spec, k, torch.device("cpu"), exchanges[k]) for k in range(spec["peers"])]
    results: dict[int, tuple] = {}

    def run(k: int) -> None:
        results[k] = (time_methods(jobs[k], spec["rounds"], spec["block"]),
                      time_exchange(exchanges[k], spec["payload"], spec["latency_calls"]))

    raise_first_error(run_in_threads(run, spec["peers"], torch_threads=1))
    return results[0]


def _ray_bench(spec: dict) -> dict:
    from codistill.engine.ray.workers import run_on_workers
    from codistill.exchange.object_store import GatherCoordinator

    spec = {**spec, "coordinator": GatherCoordinator.remote(spec["peers"])}
    return run_on_workers(_ray_bench_worker, spec, spec["peers"])


def _wall_times(steps: int, storage: str) -> dict:
    from codistill.engine.run import train

    walls, medians = {}, {}
    for backend in ("local", "ray"):
        cfg = load_config(DEMO_CONFIG, [f"name=bench_{backend}", f"train.steps={steps}",
                                                       f"ray.storage_path={storage}", "train.checkpoint_every=0"])
        started = time.perf_counter()
        result = train(cfg, backend)
        walls[backend] = time.perf_counter() - started
        step_ms = [r["step_ms"] for r in result.records.to_pylist() if r["split"] == "train"]
        medians[backend] = statistics.median(step_ms)
    return {"steps": steps, "local_wall_s": walls["local"], "ray_wall_s": walls["ray"],
            "wall_ratio_ray_over_local": walls["ray"] / walls["local"],
            "step_ratio_ray_over_local": medians["ray"] / medians["local"]}


def _summarise_steps(steps: dict[str, list[float]]) -> dict:
    row = {"independent_ms": 1000 * statistics.median(steps["independent"]), "blocks": len(steps["independent"])}
    for arm in ("dml",):
        row[f"{arm}_ms"] = 1000 * statistics.median(steps[arm])
        row[f"{arm}_over_independent"] = paired_ratio(steps["independent"], steps[arm])
        row[f"{arm}_exchange_ms"] = 1000 * statistics.median(steps[f"{arm}_exchange"])
    return row


def main(args: argparse.Namespace) -> int:
    from codistill.engine.ray.connect import connect_ray, disconnect_ray

    with tempfile.TemporaryDirectory() as folder:
        image_model = MODELS[args.model].input_kind == "image"
        config = {"method": {"name": "dml"},
                  "peers": [{"model": args.model, "optimizer": {"name": "sgd", "lr": 0.05}}] * args.peers,
                  "data": {"name": "synthetic_images" if image_model else "synthetic", "batch_size": args.batch_size}}
        spec = {"config": config, "peers": args.peers, "rounds": args.rounds, "block": args.block,
                "payload": (128, 100), "latency_calls": args.latency_calls}
        print(f"# codistill bench dml — {args.peers} × {args.model}, batch {args.batch_size}, "
              f"{args.rounds} rounds of one block of {args.block} steps per arm (independent, dml), "
              "order rotating", flush=True)
        local_steps, local_latency = _local_bench(spec)
        connect_ray(None)
        ray_figures = _ray_bench(spec)
        figures = {
            "model": args.model, "peers": args.peers, "batch_size": args.batch_size,
            "step_time": {"local": _summarise_steps(local_steps), "ray_collective": _summarise_steps(ray_figures["steps"])},
            "exchange_latency_128x100": {"local": latency_row(local_latency),
                                         "collective": latency_row(ray_figures["latency"]["collective"]),
                                         "object_store": latency_row(ray_figures["latency"]["object_store"])},
        }
        if not args.skip_wall:
            figures["wall_time"] = _wall_times(args.wall_steps, folder)
    print("\nstep time, median block    independent      dml   dml ÷ independent [95% CI]   exchange incl. wait")
    for runner, row in figures["step_time"].items():
        print(f"  {runner:<24}{row['independent_ms']:>9.1f} ms{row['dml_ms']:>7.1f} ms"
              f"   {ratio_text(row['dml_over_independent']):>22}   {row['dml_exchange_ms']:>10.1f} ms")
    print_latencies("exchange latency, 128×100 float32", figures["exchange_latency_128x100"], 34)
    if "wall_time" in figures:
        w = figures["wall_time"]
        print(f"\nwall time, demo DML ({w['steps']} steps): local {w['local_wall_s']:.1f} s, ray {w['ray_wall_s']:.1f} s"
              f" → ray ÷ local {w['wall_ratio_ray_over_local']:.2f} (median step: {w['step_ratio_ray_over_local']:.2f})")
    write_json(args.out, figures)
    disconnect_ray()
    return 0
