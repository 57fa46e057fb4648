"""`codistill train | tune | compare | born-again | report | track | list | bench` — parse → build → run → close."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import replace

from codistill.config import ConfigError, data_parallel, dump_config, load_config, load_yaml
from codistill.errors import RunError, first_line


def _progress_bar(total: int, initial_text: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=initial_text, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(step: int, metrics: dict) -> None:
        bar.update(max(0, step - bar.n))
        if "best_accuracy" in metrics:
            bar.set_postfix(best=f"{100 * metrics['best_accuracy']:.1f}%",
                            ensemble=f"{100 * metrics['ensemble_accuracy']:.1f}%")

    return bar, update


def _overrides(args: argparse.Namespace) -> list[str]:
    """--set values, plus --import modules appended to the config's `imports`."""
    overrides = list(args.set or [])
    if args.imports:
        overrides.append(f"imports+={','.join(args.imports)}")
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    from codistill.engine.ray.connect import connect_ray
    from codistill.engine.run import train

    overrides = _overrides(args)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    cfg = load_config(args.config, overrides)
    if args.data_parallel:  # compare's data_parallel arm, as a run of its own beside the peers' run
        cfg = replace(data_parallel(cfg), name=f"{cfg.name}.data_parallel")
    print(f"# resolved config ({args.backend} backend)\n{dump_config(cfg)}", flush=True)
    if args.backend == "ray":
        # Worker logs stay in Ray's session folder; on the terminal they would bury the summary.
        connect_ray(cfg.ray.address, log_to_driver=args.ray_logs)
    bar, update = _progress_bar(cfg.train.steps, cfg.name)
    try:
        result = train(cfg, args.backend, on_progress=update)
    except (KeyboardInterrupt, SystemExit) as stop:  # Ray's own Ctrl-C handler ends its run with SystemExit
        bar.close()
        print(f"{_how_stopped(stop)} at step {bar.n}: {_saved_up_to(cfg)}; re-run the same command to resume.",
              file=sys.stderr, flush=True)
        _leave_after_interrupt(_stop_code(stop))
    finally:
        bar.close()
    print(result.summary)
    print(f"records: {result.storage.uri}/records.parquet\nplot:    {result.plot_path}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM — what Kubernetes and batch schedulers send to stop a job — taken as Ctrl-C is: the
    run stops at its next step, says what is saved and releases its lease (a retry on another
    host then starts at once instead of waiting for the lease to go stale)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _terminated(stop: BaseException) -> bool:
    # Ray's driver replaces this handler with its own, which exits with the signal's number.
    return isinstance(stop, Terminated) or (isinstance(stop, SystemExit) and stop.code == signal.SIGTERM)


def _how_stopped(stop: BaseException) -> str:
    return "terminated (SIGTERM)" if _terminated(stop) else "interrupted"


def _stop_code(stop: BaseException) -> int:
    return 128 + signal.SIGTERM if _terminated(stop) else 130  # the shell's codes: 143, 130


def _leave_after_interrupt(code: int) -> None:
    """Exit at once after Ctrl-C, or past threads user code left running. Threads (torch's pools,
    Ray's) may still be winding down, and C++ destructors at a normal interpreter exit can then abort
    the process and hide the exit code; so stop the Ray instance this process started, flush, go."""
    try:
        if "ray" in sys.modules:  # else this process runs no Ray
            from codistill.engine.ray.connect import disconnect_ray

            disconnect_ray()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _saved_up_to(cfg) -> str:
    from codistill.engine.run import saved_up_to
    from codistill.storage import RunStorage, resolve_storage_path

    try:
        storage = RunStorage(resolve_storage_path(cfg.ray.storage_path), cfg.name)
    except Exception:  # noqa: BLE001 — the message must come out whatever the storage says
        return "no checkpoint that loads was written yet"
    return saved_up_to(storage, cfg.num_peers)


def cmd_report(args: argparse.Namespace) -> int:
    import yaml

    from codistill.engine.run import CONFIG_FILE, unfinished_line
    from codistill.records import RecordsError, plot_accuracy, read_records, summary_text
    from codistill.storage import RunStorage

    storage = RunStorage.at(args.run_dir)
    if not storage.exists(CONFIG_FILE):
        raise SystemExit(f"error: {storage.uri} is not a codistill run (no {CONFIG_FILE}){_what_else_it_is(storage)}")
    try:
        config = load_yaml(storage.read_bytes(CONFIG_FILE).decode())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError("", f"{storage.uri}/{CONFIG_FILE}, the run's stored config, cannot be read: "
                              f"{type(err).__name__}{at}: {first_line(getattr(err, 'problem', None) or err)}") from None
    if not isinstance(config, dict) or not isinstance(config.get("peers", []), list):
        raise ConfigError("", f"{storage.uri}/{CONFIG_FILE}, the run's stored config, is not a codistill config "
                              f"(a mapping with `peers`: a list); got {type(config).__name__}")
    try:
        table = read_records(storage)
    except RecordsError as err:  # a part damaged or missing: the report cannot be made; one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError:  # stopped (or refused) before its first step was recorded
        print(f"error: {storage.uri} has no records yet: the run stopped before its first step was recorded; "
              "re-run its command to train it", file=sys.stderr)
        return 2
    models = [str(p.get("model", "")) if isinstance(p, dict) else "" for p in config.get("peers", [])]
    print(summary_text(table, models, unfinished_line(storage, table, config.get("train"), len(models))))
    print(f"plot: {plot_accuracy(table, storage)}")
    return 0


def _what_else_it_is(storage) -> str:
    """Where to look instead, when the folder is a comparison's or a sweep's, not a run's."""
    from codistill.experiments.compare_report import MARKDOWN_FILE
    from codistill.experiments.tune import SWEEP_FILE, TRIALS_FILE  # tune writes the one, reads the other

    if storage.exists(MARKDOWN_FILE):
        return f"; it is a comparison: its table is {storage.uri}/{MARKDOWN_FILE}, each cell a run beside it"
    if storage.exists(TRIALS_FILE) or storage.exists(SWEEP_FILE):
        return f"; it is a sweep: its trials are {storage.uri}/{TRIALS_FILE}, each trial a run under runs/"
    return ""


def cmd_tune(args: argparse.Namespace) -> int:
    from codistill.engine.ray.connect import connect_ray
    from codistill.experiments.stored_sweep import refuse_a_changed_sweep
    from codistill.experiments.tune import BEST_FILE, PLOT_FILE, TRIALS_FILE, run_sweep

    overrides = _overrides(args)
    for flag, key in ((args.samples, "num_samples"), (args.max_concurrent, "max_concurrent"),
                      (args.scheduler, "scheduler"), (args.search, "search")):
        if flag is not None:
            overrides.append(f"tune.{key}={flag}")
    if args.address:
        overrides.append(f"ray.address={args.address}")
    cfg = load_config(args.config, overrides)
    if cfg.tune is None or not cfg.tune.space:
        raise ConfigError("tune.space", "is required for `codistill tune` (e.g. `method.temperature: loguniform(1, 10)`)")
    print(f"# resolved config\n{dump_config(cfg)}", flush=True)
    refuse_a_changed_sweep(cfg)  # before Ray starts: a refusal costs no instance
    connect_ray(cfg.ray.address, log_to_driver=args.ray_logs)
    result = run_sweep(cfg)
    print(result.summary)
    uri = result.storage.uri
    print(f"trials: {uri}/{TRIALS_FILE}\nplot:   {uri}/{PLOT_FILE}")
    if result.best_config is not None:
        print(f"best:   {uri}/{BEST_FILE} ({cfg.tune.objective} {result.score.shown(result.best_objective)})")
    else:
        print("no trial finished: no best config")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from codistill.experiments.compare import TABLE_FILE, compare
    from codistill.experiments.compare_report import MARKDOWN_FILE, PLOT_FILE
    from codistill.engine.ray.connect import connect_ray

    cfg = load_config(args.config, _overrides(args) + ([f"ray.address={args.address}"] if args.address else []))
    if args.tune is not None and args.tune < 1:
        raise ConfigError("--tune", f"is the number of trials per method, >= 1; got {args.tune}")
    if args.backend == "ray" or args.tune:
        connect_ray(cfg.ray.address, log_to_driver=args.ray_logs)
    try:
        result = compare(cfg, args.methods, args.seeds, args.backend, args.tune or 0,
                         log=lambda text: print(text, flush=True), baseline=args.baseline, fresh=args.fresh,
                         target=args.target)
    except (KeyboardInterrupt, SystemExit) as stop:
        print(f"{_how_stopped(stop)}: finished cells are kept; re-run the same command to go on.", file=sys.stderr,
              flush=True)
        _leave_after_interrupt(_stop_code(stop))
    print(result.markdown)
    uri = result.storage.uri
    print(f"table:    {uri}/{TABLE_FILE}\nmarkdown: {uri}/{MARKDOWN_FILE}\nplot:     {uri}/{PLOT_FILE}")
    return 0


def cmd_born_again(args: argparse.Namespace) -> int:
    from codistill.experiments.born_again import GENERATIONS_FILE, run_generations
    from codistill.engine.ray.connect import connect_ray

    overrides = _overrides(args)
    if args.generations is not None:
        overrides.append(f"born_again.generations={args.generations}")
    if args.address:
        overrides.append(f"ray.address={args.address}")
    cfg = load_config(args.config, overrides)
    if cfg.born_again is None:
        raise ConfigError("born_again", "is required for `codistill born-again` (e.g. `born_again: {generations: 3}`)")
    print(f"# resolved config ({args.backend} backend)\n{dump_config(cfg)}", flush=True)
    if args.backend == "ray":
        connect_ray(cfg.ray.address, log_to_driver=args.ray_logs)
    try:
        result = run_generations(cfg, args.backend)
    except (KeyboardInterrupt, SystemExit) as stop:
        # Each generation is a run of its own that released its lease on the way out.
        print(f"{_how_stopped(stop)}: finished generations are kept and the current one is saved up to its newest "
              "checkpoint; re-run the same command to go on.", file=sys.stderr, flush=True)
        _leave_after_interrupt(_stop_code(stop))
    print(result.summary)
    print(f"table: {result.storage.uri}/{GENERATIONS_FILE}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from codistill.config.builder import import_modules

    from codistill.listing import registry_lines

    import_modules(args.imports or [])  # what the user's own modules register is listed too
    for kind in [args.kind] if args.kind else ["methods", "models", "datasets"]:
        if not args.kind:
            print(f"# {kind}")
        print("\n".join(registry_lines(kind)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from codistill.export import main as export

    return export(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from codistill import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imports = argparse.ArgumentParser(add_help=False)
    imports.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                         help="import MODULE first (where your own models, data sets or methods register); "
                              "added to the config's `imports`, so every Ray worker imports it too")

    p = sub.add_parser("train", help="train the peers of a config", parents=[imports])
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set method.temperature=3 --set peers.*.optimizer.lr=0.05")
    p.add_argument("--backend", choices=["ray", "local"], default="ray",
                   help="ray: one Ray Train worker per peer (default); local: peers as threads in this process")
    p.add_argument("--data-parallel", action="store_true",
                   help="train ONE model on all the peers' workers instead (their summed batch, peer 0's model, the "
                        "lr scaled by the group size): compare's data_parallel arm, run as <name>.data_parallel")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local instance)")
    p.add_argument("--ray-logs", action="store_true", help="stream Ray worker logs to this terminal")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="search distillation settings with Ray Tune (the config's `tune:` section)", parents=[imports])
    p.add_argument("config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--samples", type=int, help="trials to sample (tune.num_samples)")
    p.add_argument("--max-concurrent", type=int, help="trials at once, each a whole peer group (tune.max_concurrent)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], help="asha stops bad trials early (tune.scheduler)")
    p.add_argument("--search", choices=["random", "optuna"], help="optuna needs codistill[tune] (tune.search)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local instance)")
    p.add_argument("--ray-logs", action="store_true", help="stream Ray worker logs to this terminal")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("compare", help="methods x seeds under one recipe: paired differences to a baseline", parents=[imports])
    p.add_argument("config", help="the shared recipe: peers, data, steps, optimizer (its method is replaced)")
    p.add_argument("--methods", nargs="+", required=True, metavar="METHOD", help="registered names, with settings "
                   "after a colon: dml kdcl:variant=min_logit one:branches=3; data_parallel: one model on all workers")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds of every method: a seed fixes every peer's initial weights and batches (default 0 1 2)")
    p.add_argument("--tune", type=int, metavar="N",
                   help="first give every method N Ray Tune trials on a validation split, then run the seeds at its best")
    p.add_argument("--baseline", metavar="METHOD",
                   help="the method every other is paired with by seed (default: the first of --methods)")
    p.add_argument("--target", type=float, metavar="Q", help="report steps, examples, seconds to reach this quality "
                   "(accuracy as a fraction, or bits per token; default: the data_parallel arm's final)")
    p.add_argument("--fresh", action="store_true", help="discard stored cells and tunings that were made with "
                   "another config, and run them again (without it such a command stops before running anything)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a value of the recipe")
    p.add_argument("--backend", choices=["ray", "local"], default="local",
                   help="how the seeds' runs train their peers (default local; tuning trials run their peers as "
                        "threads in a trial)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local instance)")
    p.add_argument("--ray-logs", action="store_true", help="stream Ray worker logs to this terminal")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("born-again", help="born-again networks: N generations, each taught by the one before", parents=[imports])
    p.add_argument("config", help="YAML config with a `born_again:` section (see configs/born_again_mnist1d.yaml)")
    p.add_argument("--generations", type=int, help="generations in all (born_again.generations)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--backend", choices=["ray", "local"], default="ray")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local instance)")
    p.add_argument("--ray-logs", action="store_true", help="stream Ray worker logs to this terminal")
    p.set_defaults(func=cmd_born_again)

    p = sub.add_parser("report", help="print the summary of a run and write its plot again")
    p.add_argument("run_dir", help="the run's folder: <storage_path>/<name>")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write an hf_causal_lm peer of a run as a folder from_pretrained loads")
    p.add_argument("run_dir", help="the run's folder: <storage_path>/<name>")
    p.add_argument("--peer", type=int, default=0, help="which peer (default 0)")
    p.add_argument("--to", required=True, metavar="DIR", help="the folder to write (new or empty)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("track", help="send a run's records to a tracker after the fact (docs/tracking.md)")
    from codistill.tracking.backfill import add_arguments as track_arguments
    track_arguments(p)  # and its command

    p = sub.add_parser("list", help="what is registered: methods, models, data sets (each with its one line)",
                       parents=[imports])
    p.add_argument("kind", nargs="?", choices=["methods", "models", "datasets"], help="one registry (default: all three)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("bench", help="measure overheads side by side (docs/benchmarks.md)")
    from codistill.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def run_command(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (ConnectionError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # outside a command's own handler (a slow import): one line, no traceback
        print(f"{_how_stopped(stop)}" + (f": {stop}" if str(stop) else ""), file=sys.stderr, flush=True)
        _leave_after_interrupt(_stop_code(stop))
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, before)


def main(argv: list[str] | None = None) -> int:
    """The `codistill` program. Called from Python with `argv`, it returns the command's code; as
    the program (no `argv`), the process ends with that code even when user code left non-daemon
    threads running — Python would wait for them at exit, and a batch job or a Tune trial hang."""
    if argv is not None:
        return run_command(argv)
    try:
        code = run_command()
    except SystemExit as stop:  # argparse's usage errors; a command's own `SystemExit("error: …")`
        code = stop.code
        if not isinstance(code, (int, type(None))):
            print(code, file=sys.stderr)  # as Python would, exiting 1
            code = 1
    left = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
    if left:
        print(f"note: user code left {len(left)} non-daemon thread{'s' * (len(left) > 1)} running "
              f"({', '.join(left)}); exiting anyway", file=sys.stderr)
        _leave_after_interrupt(code or 0)
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
