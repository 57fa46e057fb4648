"""`codistill bench dml | codistill | step | bare | kl | rounds | shard | tracking | noise-scale`: where the
cost of distillation goes, what the framework itself costs over bare PyTorch and what tracking costs
a run, measured side by side (one module per benchmark): ratios are medians of paired blocks with a
bootstrap interval. `shard` counts what sharding a peer saves each worker. `noise-scale` measures
the task instead: the gradient noise scale, where data parallelism stops paying."""

from __future__ import annotations

import argparse

from codistill.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", choices=["dml", "codistill", "step", "bare", "kl", "rounds", "shard", "tracking", "noise-scale"], help="what to measure")
    parser.add_argument("source", nargs="?", metavar="CONFIG|RUN",
                        help="noise-scale: a config (a fresh run of one peer) or a run folder (its checkpoints)")
    parser.add_argument("--config", help="step, bare: the config whose step is measured (default: the demo's)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="step, bare: override a config value; "
                        "shard: a value of the Llama's config (e.g. num_hidden_layers=2)")
    parser.add_argument("--workers", help="shard: the workers a peer is sharded over for memory (default 2,4)")
    parser.add_argument("--model", default="resnet20", help="peer model for the step-time ratio (default resnet20: ~50+ ms steps on CPU)")
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int,
                        help="rounds of paired blocks (one block of each arm per round; codistill: ABBA pairs; "
                        "default 30, tracking 8)")
    parser.add_argument("--block", type=int, help="steps per block (default: dml 3, step 10, bare 20; codistill: 50; "
                        "tracking: a whole run of 300)")
    parser.add_argument("--latency-calls", type=int, default=200)
    parser.add_argument("--wall-steps", type=int, default=600, help="steps of the demo run timed on both runners")
    parser.add_argument("--skip-wall", action="store_true", help="skip the Ray-vs-local wall-time run")
    parser.add_argument("--rows", type=int, default=16 * 256, help="kl: positions in the batch (default 16 × 256)")
    parser.add_argument("--vocab", type=int, default=32000, help="kl: vocabulary size (default 32,000)")
    parser.add_argument("--out", help="also write the figures as JSON here")
    noise = parser.add_argument_group("noise-scale")
    noise.add_argument("--steps", help="steps to measure at, e.g. 0,500,1000 (default: a spread over train.steps; "
                       "of a run: its checkpoints)")
    noise.add_argument("--small", type=int, help="the small batch, in examples (tokens for a language model; "
                       "default: the config's batch)")
    noise.add_argument("--big", type=int, help="the big batch, same unit (default: 10 × --small)")
    noise.add_argument("--repeats", type=int, default=100, help="pairs of batches per step (default 100)")
    noise.add_argument("--peer", type=int, default=0, help="which peer of the config or run (default 0)")
    noise.add_argument("--to", metavar="DIR", help="the output folder (default: <storage_path>/<name>.noise_scale, "
                       "or <run>.noise_scale)")


def main(args: argparse.Namespace) -> int:
    if args.source and args.which != "noise-scale":
        raise ConfigError("bench", f"{args.which} takes no CONFIG|RUN argument (give --config); got {args.source!r}")
    if args.which == "noise-scale":
        from codistill.bench.noise_scale import main as run

        return run(args)
    if args.which == "codistill":
        from codistill.bench.codistill import main as run
    elif args.which == "step":
        from codistill.bench.step import main as run
    elif args.which == "bare":
        from codistill.bench.bare import main as run
    elif args.which == "kl":
        from codistill.bench.kl import main as run
    elif args.which == "rounds":
        from codistill.bench.rounds import main as run
    elif args.which == "shard":
        from codistill.bench.shard import main as run
    elif args.which == "tracking":
        from codistill.bench.tracking import main as run
    else:
        from codistill.bench.dml import main as run
    for flag, value in (("--block", args.block), ("--rounds", args.rounds)):
        if value is not None and value < 1:  # asked, and not replaced by a default (never `or` here)
            raise ConfigError(flag, f"is {'steps per block' if flag == '--block' else 'rounds of blocks'}, "
                              f"at least 1; got {value}")
    if args.block is None:
        args.block = {"step": 10, "codistill": 50, "bare": 20, "shard": 2, "tracking": 300}.get(args.which, 3)
    if args.rounds is None:  # not `or`: an asked --rounds 0 is refused by the benchmark, not replaced
        args.rounds = {"tracking": 8}.get(args.which, 30)
    return run(args)
