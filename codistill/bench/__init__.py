"""`codistill bench dml | codistill | step | bare | kl`: where the cost of distillation goes, and what
the framework itself costs over bare PyTorch, measured side by side (one module per benchmark):
ratios are medians of paired blocks with a bootstrap interval."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", choices=["dml", "codistill", "step", "bare", "kl"], help="what to measure")
    parser.add_argument("--config", help="step, bare: the config whose step is measured (default: the demo's)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="step, bare: override a config value")
    parser.add_argument("--model", default="resnet20", help="peer model for the step-time ratio (default resnet20: ~50+ ms steps on CPU)")
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30,
                        help="rounds of paired blocks (one block of each arm per round; codistill: ABBA pairs)")
    parser.add_argument("--block", type=int, help="steps per block (default: dml 3, step 10, bare 20; codistill: 50)")
    parser.add_argument("--latency-calls", type=int, default=200)
    parser.add_argument("--wall-steps", type=int, default=600, help="steps of the demo run timed on both runners")
    parser.add_argument("--skip-wall", action="store_true", help="skip the Ray-vs-local wall-time run")
    parser.add_argument("--rows", type=int, default=16 * 256, help="kl: positions in the batch (default 16 × 256)")
    parser.add_argument("--vocab", type=int, default=32000, help="kl: vocabulary size (default 32,000)")
    parser.add_argument("--out", help="also write the figures as JSON here")


def main(args: argparse.Namespace) -> int:
    if args.which == "codistill":
        from codistill.bench.codistill import main as run
    elif args.which == "step":
        from codistill.bench.step import main as run
    elif args.which == "bare":
        from codistill.bench.bare import main as run
    elif args.which == "kl":
        from codistill.bench.kl import main as run
    else:
        from codistill.bench.dml import main as run
    args.block = args.block or {"step": 10, "codistill": 50, "bare": 20}.get(args.which, 3)
    return run(args)
