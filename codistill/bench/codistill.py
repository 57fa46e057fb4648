"""`codistill bench codistill`: codistillation's amortised overhead per period (against
independent training, ABBA blocks), one round's latency through the object-store round board
per payload, and bytes per round."""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch

from codistill.bench.common import latency_row, paired_ratio, print_latencies, ratio_text, write_json
from codistill.config import load_config
from codistill.data import load_dataset
from codistill.engine.job import make_job, peer_schedules
from codistill.engine.loop import train_step
from codistill.engine.threads import raise_first_error, run_in_threads
from codistill.exchange import LocalGatherHub, LocalPublications


def _codistill_overhead(periods: list[int], rounds_per_period: int, block_steps: int = 50) -> dict:
    """Step time of codistillation ÷ independent training, two MNIST-1D CNN peers as threads,
    in ABBA blocks of `block_steps` steps (by default 50: a whole number of rounds for every
    period): the median of the paired block ratios with its bootstrap interval."""
    base = {"peers": [{"model": "mnist1d_cnn"}] * 2, "data": {"name": "mnist1d", "batch_size": 100}}
    data = load_dataset("mnist1d")
    results = {}
    for period in periods:
        hub, publications = LocalGatherHub(2), LocalPublications(2)
        jobs = []  # per peer: the same peer as an independent and as a codistillation job
        for k in range(2):
            by_method = {}
            for name, method in (("independent", {"name": "independent"}),
                                 ("codistill", {"name": "codistill", "period": period, "max_staleness": 0})):
                cfg = load_config({**base, "method": method})
                by_method[name] = make_job(cfg, k, data, peer_schedules(cfg, len(data.y_train)), torch.device("cpu"),
                                           hub.exchange_for(k), publications.exchange_for(k))
            jobs.append(by_method)
        times: dict[str, list[float]] = {"independent": [], "codistill": []}
        barrier = threading.Barrier(2)
        rounds: list[dict] = []

        def run(k: int) -> None:
            step = 0
            for block in range(2 * rounds_per_period):
                name = ("independent", "codistill")[(block + block // 2) % 2]  # ABBA order cancels drift
                barrier.wait()
                spent = 0.0
                for _ in range(block_steps):
                    started = time.perf_counter()
                    record = train_step(jobs[k][name], step)
                    spent += time.perf_counter() - started
                    if k == 0 and "round" in record:
                        rounds.append(record)
                    step += 1
                if k == 0:
                    times[name].append(spent / block_steps)

        raise_first_error(run_in_threads(run, 2))
        ind, cod = statistics.median(times["independent"]), statistics.median(times["codistill"])
        # Split the overhead: the teacher pass (predicting the round's batches) is compute that
        # codistillation needs wherever it runs; the rest of a round is the exchange itself.
        steps = block_steps * len(times["codistill"])
        predict_per_step = sum(r["predict_ms"] for r in rounds) / steps / 1000
        exchange_per_step = sum(r["round_ms"] - r["predict_ms"] for r in rounds) / steps / 1000
        # Blocks run A B B A A B …: each consecutive pair holds one block of each.
        results[period] = {"independent_ms": 1000 * ind, "codistill_ms": 1000 * cod,
                           "ratio": paired_ratio(times["independent"], times["codistill"]), "steps_per_arm": steps,
                           "teacher_pass_share": predict_per_step / ind, "exchange_share": exchange_per_step / ind}
    return results


def _round_latency(calls: int) -> dict:
    """One round through the object-store round board, per payload: the periodic exchange's
    own `round_trip` (put, one actor call that publishes and answers, fetch), as a peer calls it
    (a group of one that fetches its own publication, so nothing waits for another peer)."""
    from codistill.exchange.round_board import GroupRoundBoard, ObjectStorePeriodicExchange
    from codistill.models import create_model

    coordinator = GroupRoundBoard.remote(1)
    periodic = ObjectStorePeriodicExchange(coordinator, 0)
    payloads = {
        "predictions 1×100×10 (period 1)": {"logits": torch.randn(1, 1, 100, 10)},
        "predictions 50×100×10 (period 50)": {"logits": torch.randn(1, 50, 100, 10)},
        "predictions 50×128×100 (CIFAR-100, period 50)": {"logits": torch.randn(1, 50, 128, 100)},
        "predictions 50×128×100 bf16": {"logits": torch.randn(1, 50, 128, 100).bfloat16()},
        # A language model's round: 10 steps × (16 windows × 128 positions) × a 1024-token vocabulary.
        "LM predictions 10×2048×1024, full (fp32)": {"logits": torch.randn(1, 10, 2048, 1024)},
        "LM predictions, top-64 (fp16 + ids)": _top_k_block(64),
        "LM predictions, top-8 (fp16 + ids)": _top_k_block(8),
        "weights mnist1d_cnn": create_model("mnist1d_cnn", 10).state_dict(),
        "weights resnet32": create_model("resnet32", 100).state_dict(),
    }
    out = {}
    round_id = 0
    for name, payload in payloads.items():
        latencies = []
        for r in range(calls + 3):
            started = time.perf_counter()
            periodic.round_trip(round_id, 0, payload, [0], round_id, round_id, 10.0)  # what a peer does each round
            if r >= 3:
                latencies.append(time.perf_counter() - started)
            round_id += 1
        out[name] = latency_row(latencies)
    return out


def _top_k_block(k: int) -> dict:
    from codistill.methods.losses import top_k_targets

    target = top_k_targets(torch.randn(10 * 2048, 1024), k, 1.0)
    return {name: t.view(1, 10, 2048, -1) for name, t in target.items()}


def _bytes_per_round() -> list[dict]:
    from codistill.models import create_model

    rows = []
    for model, classes, batch in (("mnist1d_cnn", 10, 100), ("resnet32", 100, 128)):
        weights = sum(t.numel() * t.element_size() for t in create_model(model, classes).state_dict().values())
        for period in (1, 10, 50):
            predictions = period * batch * classes * 4  # one round's batches, float32, max_staleness 0
            rows.append({"model": model, "period": period, "predictions_bytes": predictions,
                         "predictions_bf16_bytes": predictions // 2, "weights_bytes": weights})
    return rows


def main(args: argparse.Namespace) -> int:
    from codistill.engine.ray.connect import connect_ray, disconnect_ray

    print("# codistill bench codistill — 2 MNIST-1D CNN peers (threads), object-store round board on local Ray", flush=True)
    periods = [1, 10, 50]
    if any(args.block % p for p in periods):  # a block that cuts a round would split its cost between arms
        print(f"codistill bench: --block {args.block} is not a whole number of rounds for periods {periods}; "
              "use a multiple of 50", file=sys.stderr)
        return 2
    figures = {"overhead": _codistill_overhead(periods, args.rounds, args.block), "bytes_per_round": _bytes_per_round()}
    connect_ray(None)
    figures["round_latency"] = _round_latency(args.latency_calls)
    disconnect_ray()
    print(f"\namortised step time, median block ({2 * args.rounds} blocks of {args.block} steps, ABBA)\n"
          "                  independent  codistill   ratio [95% CI]          of which: teacher pass  exchange")
    for period, row in figures["overhead"].items():
        print(f"  period {period:<8}{row['independent_ms']:>8.2f} ms{row['codistill_ms']:>8.2f} ms   "
              f"{ratio_text(row['ratio']):<24}{100 * row['teacher_pass_share']:>12.1f}%{100 * row['exchange_share']:>9.1f}%")
    print_latencies("round trip through the object-store round board", figures["round_latency"], 46)
    from codistill.exchange.base import payload_bytes
    print("\nLM round (10 steps × 16 × 128 positions, vocabulary 1024): full "
          f"{10 * 2048 * 1024 * 4:,} bytes, top-64 {payload_bytes(_top_k_block(64)):,}, top-8 {payload_bytes(_top_k_block(8)):,}")
    print("\nbytes per round per peer     period   predictions  (bf16)         weights")
    for row in figures["bytes_per_round"]:
        print(f"  {row['model']:<26}{row['period']:>6}{row['predictions_bytes']:>14,}{row['predictions_bf16_bytes']:>12,}"
              f"{row['weights_bytes']:>14,}")
    write_json(args.out, figures)
    return 0
