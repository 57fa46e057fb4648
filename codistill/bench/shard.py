"""`codistill bench shard`: what sharding a peer over its M workers (FSDP2, `train.sharding: fsdp`)
saves per worker, and what it costs a step, against DDP (`ddp`, every worker holding the whole
peer), for a ~50M-parameter Hugging Face Llama built from a config (`LLAMA`; nothing downloaded).

- **Memory**, for each M of `--workers`, in a fresh gloo world of M processes on this machine's
  CPUs (torch.multiprocessing, as the sharding tests start theirs): each sharding alone — built,
  one training step (AdamW, fp32), counted, freed — the bytes of the parameters, gradients and
  optimizer state each rank holds itself, counted from its tensors (`sharding.local_state_bytes`,
  the engine's `state_mb`): an event, not an estimate; and the rank's peak resident set during
  that arm (the kernel's peak count reset before it, so each arm's peak is its own).
- **Step time** at M = 2, in the same world: DDP and FSDP side by side, stepped in paired blocks in
  alternating order (ABBA); FSDP ÷ DDP is the median of the per-pair ratios with its 95%
  bootstrap interval (`common.paired_ratio`, as every bench ratio).

The peer is built as the engine builds it (`engine.job._split`): DDP is `MeshPlace.replicated`,
FSDP is `sharding.fully_sharded` over the decoder layers and then the root, the optimizer built
after sharding."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from codistill.bench.common import paired_ratio, ratio_text, write_json
from codistill.bench.rounds import LLAMA_50M

# 51.7M parameters: `bench rounds`' Llama with 6 of its 8 blocks (width 512, 8 heads, MLP 1376;
# 32,000 tokens, untied: 2 × 16.4M of embeddings, 6 × 3.2M of blocks) — 6 rather than 8 so that
# DDP's four whole copies (~1.3 GB a worker with its gradient buckets) stay within ~6 GB.
LLAMA = {**LLAMA_50M, "num_hidden_layers": 6}
SHARDINGS = ("ddp", "fsdp")
SEQUENCES, CONTEXT = 4, 64  # per worker: 256 tokens a step (a step stays ~1 s on one CPU thread)
STATE = ("parameters", "gradients", "optimizer")


def llama_config(overrides: list[str]) -> dict:
    """LLAMA with `--set KEY=VALUE` overrides of its own keys (ints, or true/false)."""
    import yaml

    from codistill.errors import check

    config = dict(LLAMA)
    for item in overrides:
        key, eq, value = item.partition("=")
        check(bool(eq) and key in config and key != "model_type", "--set",
              f"takes KEY=VALUE of the Llama's config, KEY one of {', '.join(k for k in config if k != 'model_type')}; "
              f"got {item!r}")
        config[key] = yaml.safe_load(value)
    return config


def _build(sharding: str, config: dict, place):
    """(what the step runs, the network, its optimizer), built as the engine builds a peer."""
    from codistill.engine.precision import Precision
    from codistill.engine.sharding import blocks_of, fully_sharded
    from codistill.models import create_model

    torch.manual_seed(0)  # the same weights on every rank and in both arms
    network = create_model("hf_causal_lm", config["vocab_size"], config=config)
    if sharding == "ddp":
        train = place.replicated(network, torch.device("cpu"))
    else:
        policy = Precision("fp32", torch.device("cpu"), sharded=True).sharding_policy()
        train = fully_sharded(network, blocks_of("hf_causal_lm", network), place.replica_mesh, policy)
    return train, network, torch.optim.AdamW(network.parameters(), lr=1e-4)


def _step(arm, tokens: torch.Tensor) -> None:
    train, _, optimizer = arm
    optimizer.zero_grad(set_to_none=True)
    logits = train(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits, tokens[:, 1:].reshape(-1)).backward()
    optimizer.step()


def _resident() -> tuple[int, int]:
    """(resident now, peak resident since the last reset) of this process in bytes (Linux)."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))


def _reset_peak() -> None:
    """Restart the peak resident count (Linux ≥ 4.0), so each arm's peak is its own in one process."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _worker(rank: int, world: int, init_file: str, out: str, config: dict, rounds: int, block: int) -> None:
    """One rank of a 1-peer × `world`-worker gloo world: each sharding built, stepped once and
    counted alone (then freed); then, given `rounds`, both built and their blocks timed in
    alternating order."""
    import gc

    import torch.distributed as dist

    from codistill.engine.mesh import PeerMesh
    from codistill.engine.sharding import local_state_bytes

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        place = PeerMesh(1, world).build(torch.device("cpu"))
        generator = torch.Generator().manual_seed(rank)  # each rank its own slice of the batch
        tokens = torch.randint(config["vocab_size"], (SEQUENCES, CONTEXT + 1), generator=generator)
        seen = {"memory": {}, "blocks": {s: [] for s in SHARDINGS}}
        for sharding in SHARDINGS:
            gc.collect()
            dist.barrier()
            _reset_peak()
            before = _resident()[0]
            arm = _build(sharding, config, place)
            _step(arm, tokens)  # after a step: gradients and Adam's moments exist
            seen["memory"][sharding] = {**local_state_bytes(arm[1], arm[2]), "rss_start": before,
                                        "rss_peak": _resident()[1]}
            seen["parameters"] = sum(p.numel() for p in arm[1].parameters())  # whole, sharded or not
            del arm
        arms = {s: _build(s, config, place) for s in SHARDINGS} if rounds else {}
        for arm in arms.values():
            _step(arm, tokens)  # warm-up: the allocator, gloo's buffers
        for r in range(rounds):
            for sharding in SHARDINGS if r % 2 == 0 else SHARDINGS[::-1]:
                dist.barrier()
                started = time.perf_counter()
                for _ in range(block):
                    _step(arms[sharding], tokens)
                seen["blocks"][sharding].append((time.perf_counter() - started) / block)
        torch.save(seen, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _world(world: int, config: dict, rounds: int = 0, block: int = 0) -> list[dict]:
    """What each rank of a fresh `world`-process gloo world saw."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="codistill-bench-shard-") as folder:
        out = os.path.join(folder, "seen")
        mp.spawn(_worker, args=(world, os.path.join(folder, "init"), out, config, rounds, block), nprocs=world,
                 join=True)
        return [torch.load(f"{out}.{rank}") for rank in range(world)]


def check_arguments(args: argparse.Namespace) -> list[int]:
    from codistill.errors import check

    text = args.workers or "2,4"
    workers = [int(w) for w in text.split(",") if w.strip().isdigit()]
    check(len(workers) == len(text.split(",")) and 2 in workers and all(w >= 2 for w in workers), "--workers",
          f"is the workers a peer is sharded over, integers of at least 2 with commas, 2 among them (the step is "
          f"timed there); got {text!r}")
    check(args.rounds >= 2, "--rounds", f"is the pairs of timed blocks, at least 2; got {args.rounds}")
    return workers


def main(args: argparse.Namespace) -> int:
    workers = check_arguments(args)
    config = llama_config(list(args.set or []))
    print(f"# codistill bench shard — an HF Llama of {config['num_hidden_layers']} layers, width "
          f"{config['hidden_size']}, vocabulary {config['vocab_size']:,}; AdamW in fp32, {SEQUENCES} × {CONTEXT} "
          f"tokens a worker; gloo worlds of {', '.join(map(str, workers))} processes on this machine's "
          f"{os.cpu_count()} CPUs; step time at M = 2, {args.rounds} ABBA pairs of {args.block}-step blocks", flush=True)
    figures: dict = {"llama": config, "memory": {}}
    for m in workers:
        ranks = _world(m, config, args.rounds if m == 2 else 0, args.block)
        figures["parameters"] = ranks[0]["parameters"]
        for sharding in SHARDINGS:
            figures["memory"][f"{sharding}_{m}"] = {"workers": m, "sharding": sharding,
                                                    "ranks": [rank["memory"][sharding] for rank in ranks]}
        if m == 2:
            blocks = ranks[0]["blocks"]
            figures["step"] = {"workers": 2, "pairs": args.rounds, "block": args.block,
                               **{f"{s}_ms": 1000 * statistics.median(blocks[s]) for s in SHARDINGS},
                               "fsdp_over_ddp": paired_ratio(blocks["ddp"], blocks["fsdp"])}
    print(f"\n{figures['parameters'] / 1e6:.1f}M parameters; per worker after a step, its largest rank: the "
          "parameters, gradients and AdamW state it holds (counted from its tensors), and its peak resident set")
    print(f"{'M':>3}  {'sharding':<9}{'parameters':>14}{'gradients':>14}{'optimizer':>14}{'total':>15}"
          f"{'÷ DDP':>8}{'ideal':>7}{'peak RSS':>12}{'(above start)':>15}")
    for row in figures["memory"].values():
        largest = max(row["ranks"], key=lambda r: sum(r[k] for k in STATE))
        row["total"] = sum(largest[k] for k in STATE)
        row["over_ddp"] = row["total"] / figures["memory"][f"ddp_{row['workers']}"]["total"]
        row["ideal"] = 1 / row["workers"] if row["sharding"] == "fsdp" else 1.0
        peak = max(row["ranks"], key=lambda r: r["rss_peak"])
        print(f"{row['workers']:>3}  {row['sharding']:<9}" + "".join(f"{largest[k]:>14,}" for k in STATE)
              + f"{row['total']:>13,} B{row['over_ddp']:>8.3f}{row['ideal']:>7.3f}"
              + f"{peak['rss_peak'] / 2**20:>8,.0f} MiB{(peak['rss_peak'] - peak['rss_start']) / 2**20:>11,.0f} MiB")
    step = figures["step"]
    print(f"\nstep at M = 2: DDP {step['ddp_ms']:.0f} ms, FSDP {step['fsdp_ms']:.0f} ms (medians); "
          f"FSDP ÷ DDP {ratio_text(step['fsdp_over_ddp'])} over {step['pairs']} pairs")
    write_json(args.out, figures)
    return 0
