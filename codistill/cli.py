"""`codistill train | report | bench` — parse → build → run → close."""

from __future__ import annotations

import argparse
import os
import sys

from codistill.config import ConfigError, dump_config, load_config


def _progress_bar(total: int, initial_text: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=initial_text, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(step: int, metrics: dict) -> None:
        bar.update(max(0, step - bar.n))
        if "best_accuracy" in metrics:
            bar.set_postfix(best=f"{100 * metrics['best_accuracy']:.1f}%",
                            ensemble=f"{100 * metrics['ensemble_accuracy']:.1f}%")

    return bar, update


def cmd_train(args: argparse.Namespace) -> int:
    from codistill.engine.run import train

    overrides = list(args.set or [])
    if args.address:
        overrides.append(f"ray.address={args.address}")
    cfg = load_config(args.config, overrides)
    print(f"# resolved config ({args.backend} backend)\n{dump_config(cfg)}", flush=True)
    if args.backend == "ray":
        _init_ray_quietly(cfg.ray.address, args.ray_logs)
    bar, update = _progress_bar(cfg.train.steps, cfg.name)
    try:
        result = train(cfg, args.backend, on_progress=update)
    finally:
        bar.close()
    print(result.summary)
    print(f"records: {result.storage.uri}/records.parquet\nplot:    {result.plot_path}")
    return 0


def _init_ray_quietly(address: str | None, show_worker_logs: bool) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    # Worker logs are kept in Ray's session folder; on the terminal they would bury the summary.
    if address:
        ray.init(address=address, log_to_driver=show_worker_logs)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=show_worker_logs)


def cmd_report(args: argparse.Namespace) -> int:
    import yaml

    from codistill.engine.run import CONFIG_FILE
    from codistill.metrics import plot_accuracy, read_records, summary_text
    from codistill.storage import RunStorage

    run_dir = args.run_dir.rstrip("/")
    parent, name = run_dir.rsplit("/", 1) if "/" in run_dir else (".", run_dir)
    storage = RunStorage(parent, name)
    if not storage.exists(CONFIG_FILE):
        raise SystemExit(f"error: {storage.uri} is not a codistill run (no {CONFIG_FILE})")
    config = yaml.safe_load(storage.read_bytes(CONFIG_FILE).decode())
    table = read_records(storage)
    print(summary_text(table, [p["model"] for p in config.get("peers", [])]))
    print(f"plot: {plot_accuracy(table, storage)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from codistill import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the peers of a config")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set method.temperature=3 --set peers.*.optimizer.lr=0.05")
    p.add_argument("--backend", choices=["ray", "local"], default="ray",
                   help="ray: one Ray Train worker per peer (default); local: peers as threads in this process")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local instance)")
    p.add_argument("--ray-logs", action="store_true", help="stream Ray worker logs to this terminal")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="print the summary of a run and write its plot again")
    p.add_argument("run_dir", help="the run's folder: <storage_path>/<name>")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="measure overheads side by side (see README)")
    from codistill.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
