"""`codistill bench dml`: where the cost of mutual learning goes, measured side by side.

Every figure is a ratio or a distribution measured in one run, with the two things compared
interleaved in alternating blocks, because the machine is shared and noisy:

1. step time of DML ÷ step time of independent training, same peers, same runner
   (local threads, and Ray Train workers with the collective transport);
2. wall time of K peers on Ray ÷ the same K peers in one process (a short demo run);
3. exchange latency p50/p90 per transport for a B×C float32 payload.

Each step is timed by `engine.loop.train_step`, the loop's own step function.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time

import torch

from codistill.config import load_config
from codistill.data import BatchSchedule, load_dataset
from codistill.engine.loop import PeerJob, build_peer, train_step
from codistill.exchange import Exchange
from codistill.exchange.local import LocalBoard
from codistill.methods import create_method
from codistill.methods.dml import DMLConfig
from codistill.methods.independent import IndependentConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", choices=["dml", "codistill"], help="what to measure")
    parser.add_argument("--model", default="resnet20", help="peer model for the step-time ratio (default resnet20: ~50+ ms steps on CPU)")
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6, help="alternating blocks per method")
    parser.add_argument("--block", type=int, default=4, help="steps per block")
    parser.add_argument("--latency-calls", type=int, default=200)
    parser.add_argument("--wall-steps", type=int, default=600, help="steps of the demo run timed on both runners")
    parser.add_argument("--skip-wall", action="store_true", help="skip the Ray-vs-local wall-time run")
    parser.add_argument("--out", help="also write the figures as JSON here")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ---------------------------------------------------------------------------------------------
# Measurements that run in every peer (a thread or a Ray worker)


def _bench_job(spec: dict, peer_index: int, device: torch.device) -> PeerJob:
    cfg = load_config(spec["config"])
    data = load_dataset(cfg.data.name, cfg.data.root, augment=True)
    schedule = BatchSchedule(len(data.y_train), cfg.data.batch_size, cfg.seed)
    method = create_method(cfg.method)
    peer = build_peer(peer_index, cfg.peers[peer_index], data.num_classes, cfg.seed, device, method)
    return PeerJob(peer, method, data, schedule, cfg.train, device)


def time_methods(job: PeerJob, exchange: Exchange, rounds: int, block: int) -> dict[str, list[float]]:
    """Step times (s) of independent vs DML on the same peer, in alternating blocks."""
    methods = {"independent": create_method(IndependentConfig(name="independent")),
               "dml": create_method(DMLConfig(name="dml", temperature=3.0))}
    times: dict[str, list[float]] = {name: [] for name in methods}
    times["dml_exchange"] = []  # the all_gather, including the wait for the slower peer
    step = 0
    for name in methods:  # warm-up: allocator, thread pools, first collective
        job.method = methods[name]
        train_step(job, exchange, step)
        step += 1
    for r in range(rounds):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for name in order:
            job.method = methods[name]
            for _ in range(block):
                started = time.perf_counter()
                record = train_step(job, exchange, step)
                times[name].append(time.perf_counter() - started)
                if name == "dml":
                    times["dml_exchange"].append(record["exchange_ms"] / 1000)
                step += 1
    return times


def time_exchange(exchange: Exchange, shape: tuple[int, int], calls: int) -> list[float]:
    payload = torch.randn(*shape)
    for _ in range(5):
        exchange.all_gather(payload)
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        exchange.all_gather(payload)
        latencies.append(time.perf_counter() - started)
    return latencies


def _ray_bench_worker(spec: dict) -> None:
    import ray.train

    from codistill.exchange.collective import CollectiveExchange
    from codistill.exchange.object_store import ObjectStoreExchange

    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(1)
    device = ray.train.torch.get_device()
    collective = CollectiveExchange(rank, spec["peers"], None, device)
    job = _bench_job(spec, rank, device)
    steps = time_methods(job, collective, spec["rounds"], spec["block"])
    latency = {
        "collective": time_exchange(collective, spec["payload"], spec["latency_calls"]),
        "object_store": time_exchange(ObjectStoreExchange(spec["board"], rank, spec["peers"]),
                                      spec["payload"], spec["latency_calls"]),
    }
    if rank == 0:  # Train V2 keeps only metrics reported with a checkpoint: hand them over directly
        ray.get(spec["mailbox"].post.remote(1, {"steps": steps, "latency": latency}))


def _local_bench(spec: dict) -> tuple[dict, list[float]]:
    board = LocalBoard(spec["peers"])
    jobs = [_bench_job(spec, k, torch.device("cpu")) for k in range(spec["peers"])]
    results: dict[int, tuple] = {}

    def run(k: int) -> None:
        exchange = board.exchange_for(k)
        results[k] = (time_methods(jobs[k], exchange, spec["rounds"], spec["block"]),
                      time_exchange(exchange, spec["payload"], spec["latency_calls"]))

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(spec["peers"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.set_num_threads(threads_before)
    return results[0]


def _ray_bench(spec: dict) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from codistill.engine.ray_runner import ProgressBoard
    from codistill.exchange.object_store import ExchangeBoard

    mailbox = ProgressBoard.remote()
    spec = {**spec, "board": ExchangeBoard.remote(spec["peers"]), "mailbox": mailbox}
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(_ray_bench_worker, train_loop_config=spec,
                               scaling_config=ray.train.ScalingConfig(num_workers=spec["peers"],
                                                                      resources_per_worker={"CPU": 1}),
                               run_config=ray.train.RunConfig(name="bench", storage_path=storage))
        trainer.fit()
    return ray.get(mailbox.get.remote())[1]


def _wall_times(steps: int, storage: str) -> dict:
    from codistill.engine.run import train

    walls, medians = {}, {}
    for backend in ("local", "ray"):
        cfg = load_config("configs/dml_mnist1d.yaml", [f"name=bench_{backend}", f"train.steps={steps}",
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
    ind, dml = statistics.median(steps["independent"]), statistics.median(steps["dml"])
    return {"independent_ms": 1000 * ind, "dml_ms": 1000 * dml, "dml_over_independent": dml / ind,
            "exchange_ms": 1000 * statistics.median(steps["dml_exchange"])}


def _latency_row(latencies: list[float]) -> dict:
    return {"p50_ms": 1000 * percentile(latencies, 0.5), "p90_ms": 1000 * percentile(latencies, 0.9)}


# ---------------------------------------------------------------------------------------------
# codistill: amortised overhead per period, round latency per payload, bytes per round


def _codistill_overhead(periods: list[int], rounds_per_period: int) -> dict:
    """Mean step time of codistillation ÷ independent training, two MNIST-1D CNN peers as
    threads, alternating blocks of 50 steps (a whole number of rounds for every period)."""
    from codistill.engine.rounds import PeriodicTeacher
    from codistill.exchange.rounds import LocalRoundBoard
    from codistill.methods.codistill import CodistillConfig

    base = {"method": {"name": "codistill"}, "peers": [{"model": "mnist1d_cnn"}] * 2,
            "data": {"name": "mnist1d", "batch_size": 100}}
    cfg = load_config(base)
    data = load_dataset("mnist1d", cfg.data.root)
    schedule = BatchSchedule(len(data.y_train), 100, 0)
    independent = create_method(IndependentConfig(name="independent"))
    results = {}
    for period in periods:
        method_cfg = CodistillConfig(name="codistill", period=period, max_staleness=0)
        board = LocalRoundBoard(2)
        times: dict[str, list[float]] = {"independent": [], "codistill": []}
        jobs = [PeerJob(build_peer(k, cfg.peers[k], 10, 0, torch.device("cpu"), independent), independent, data,
                        schedule, cfg.train, torch.device("cpu")) for k in range(2)]
        teachers = [PeriodicTeacher(job, board.for_peer(k), method_cfg, cfg.peers, [schedule])
                    for k, job in enumerate(jobs)]
        codistill_method = create_method(method_cfg)
        barrier = threading.Barrier(2)
        rounds: list[dict] = []

        def run(k: int) -> None:
            job, step = jobs[k], 0
            for block in range(2 * rounds_per_period):
                name = ("independent", "codistill")[(block + block // 2) % 2]  # ABBA order cancels drift
                job.method, job.teacher = (independent, None) if name == "independent" else (codistill_method, teachers[k])
                barrier.wait()
                for _ in range(50):
                    started = time.perf_counter()
                    record = train_step(job, None, step)
                    if k == 0:
                        times[name].append(time.perf_counter() - started)
                        if "round" in record:
                            rounds.append(record)
                    step += 1

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ind, cod = statistics.mean(times["independent"]), statistics.mean(times["codistill"])
        # Split the overhead: the teacher pass (predicting the round's batches) is compute that
        # codistillation needs wherever it runs; the rest of a round is the exchange itself.
        predict_per_step = sum(r["predict_ms"] for r in rounds) / len(times["codistill"]) / 1000
        exchange_per_step = sum(r["round_ms"] - r["predict_ms"] for r in rounds) / len(times["codistill"]) / 1000
        results[period] = {"independent_ms": 1000 * ind, "codistill_ms": 1000 * cod, "ratio": cod / ind,
                           "teacher_pass_share": predict_per_step / ind, "exchange_share": exchange_per_step / ind}
    return results


def _round_latency(calls: int) -> dict:
    """Publish + fetch of one round through the object-store board, per payload."""
    import ray

    from codistill.exchange.object_store import RoundBoardActor
    from codistill.models import create_model

    board = RoundBoardActor.remote(2)
    generation = ray.get([board.join.remote(0), board.join.remote(1)])[0]
    payloads = {
        "predictions 1×100×10 (period 1)": torch.randn(1, 1, 100, 10),
        "predictions 50×100×10 (period 50)": torch.randn(1, 50, 100, 10),
        "predictions 50×128×100 (CIFAR-100, period 50)": torch.randn(1, 50, 128, 100),
        "weights mnist1d_cnn": create_model("mnist1d_cnn", 10).state_dict(),
        "weights resnet32": create_model("resnet32", 100).state_dict(),
    }
    out = {}
    for name, payload in payloads.items():
        latencies = []
        for r in range(calls + 3):
            started = time.perf_counter()
            ref = ray.put(payload)
            ray.get(board.publish.remote(generation, r, 0, [ref]))
            round_id, boxed = ray.get(board.newest.remote(generation, 0, r, r, 10.0))
            ray.get(boxed[0])
            if r >= 3:
                latencies.append(time.perf_counter() - started)
        out[name] = _latency_row(latencies)
    ray.kill(board)
    return out


def _bytes_per_round() -> list[dict]:
    from codistill.models import create_model

    rows = []
    for model, classes, batch in (("mnist1d_cnn", 10, 100), ("resnet32", 100, 128)):
        weights = sum(t.numel() * t.element_size() for t in create_model(model, classes).state_dict().values())
        for period in (1, 10, 50):
            predictions = period * batch * classes * 4  # one round's batches, float32, max_staleness 0
            rows.append({"model": model, "period": period, "predictions_bytes": predictions, "weights_bytes": weights})
    return rows


def main_codistill(args: argparse.Namespace) -> int:
    import ray

    from codistill.engine.run import connect_ray

    print("# codistill bench codistill — 2 MNIST-1D CNN peers (threads), object-store board on local Ray", flush=True)
    figures = {"overhead": _codistill_overhead([1, 10, 50], args.rounds), "bytes_per_round": _bytes_per_round()}
    connect_ray(None)
    figures["round_latency"] = _round_latency(args.latency_calls)
    ray.shutdown()
    print("\namortised step time, mean   independent  codistill  ratio   of which: teacher pass  exchange")
    for period, row in figures["overhead"].items():
        print(f"  period {period:<19}{row['independent_ms']:>8.2f} ms{row['codistill_ms']:>8.2f} ms{row['ratio']:>7.3f}"
              f"{100 * row['teacher_pass_share']:>20.1f}%{100 * row['exchange_share']:>9.1f}%")
    _print_latencies("round trip through the object-store board", figures["round_latency"], 44)
    print("\nbytes per round per peer     period   predictions       weights")
    for row in figures["bytes_per_round"]:
        print(f"  {row['model']:<26}{row['period']:>6}{row['predictions_bytes']:>14,}{row['weights_bytes']:>14,}")
    _write_json(args.out, figures)
    return 0


def _print_latencies(title: str, rows: dict[str, dict], width: int) -> None:
    print(f"\n{title:<{width + 2}}    p50        p90")
    for name, row in rows.items():
        print(f"  {name:<{width}}{row['p50_ms']:>6.2f} ms{row['p90_ms']:>8.2f} ms")


def _write_json(path: str | None, figures: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=2)


def main(args: argparse.Namespace) -> int:
    import ray

    if args.which == "codistill":
        return main_codistill(args)

    from codistill.engine.run import connect_ray

    from codistill.models import MODELS

    with tempfile.TemporaryDirectory() as folder:
        image_model = MODELS[args.model].input_kind == "image"
        config = {"method": {"name": "dml"},
                  "peers": [{"model": args.model, "optimizer": {"name": "sgd", "lr": 0.05}}] * args.peers,
                  "data": {"name": "synthetic_images" if image_model else "synthetic", "batch_size": args.batch_size}}
        spec = {"config": config, "peers": args.peers, "rounds": args.rounds, "block": args.block,
                "payload": (128, 100), "latency_calls": args.latency_calls}
        print(f"# codistill bench dml — {args.peers} × {args.model}, batch {args.batch_size}, "
              f"{args.rounds} alternating blocks of {args.block} steps", flush=True)
        local_steps, local_latency = _local_bench(spec)
        connect_ray(None)
        ray_figures = _ray_bench(spec)
        figures = {
            "model": args.model, "peers": args.peers, "batch_size": args.batch_size,
            "step_time": {"local": _summarise_steps(local_steps), "ray_collective": _summarise_steps(ray_figures["steps"])},
            "exchange_latency_128x100": {"local": _latency_row(local_latency),
                                         "collective": _latency_row(ray_figures["latency"]["collective"]),
                                         "object_store": _latency_row(ray_figures["latency"]["object_store"])},
        }
        if not args.skip_wall:
            figures["wall_time"] = _wall_times(args.wall_steps, folder)
    print("\nstep time (median)         independent      dml    dml ÷ independent   exchange incl. wait")
    for runner, row in figures["step_time"].items():
        print(f"  {runner:<24}{row['independent_ms']:>9.1f} ms{row['dml_ms']:>7.1f} ms{row['dml_over_independent']:>12.3f}"
              f"{row['exchange_ms']:>17.1f} ms")
    _print_latencies("exchange latency, 128×100 float32", figures["exchange_latency_128x100"], 34)
    if "wall_time" in figures:
        w = figures["wall_time"]
        print(f"\nwall time, demo DML ({w['steps']} steps): local {w['local_wall_s']:.1f} s, ray {w['ray_wall_s']:.1f} s"
              f" → ray ÷ local {w['wall_ratio_ray_over_local']:.2f} (median step: {w['step_ratio_ray_over_local']:.2f})")
    _write_json(args.out, figures)
    ray.shutdown()
    return 0
