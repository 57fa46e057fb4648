"""`codistill bench dml | codistill`: where the cost of distillation goes, measured side by
side (one module per benchmark)."""

from __future__ import annotations

import argparse


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


def main(args: argparse.Namespace) -> int:
    if args.which == "codistill":
        from codistill.bench.codistill import main as run
    else:
        from codistill.bench.dml import main as run
    return run(args)
