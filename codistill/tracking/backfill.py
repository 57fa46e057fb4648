"""`codistill track RUN_FOLDER --to tensorboard|mlflow|wandb`: a run's records sent to a tracker
after the fact — for a run made before tracking was on, or on a cluster whose driver could not
reach the tracker. The same writer a training run uses (`Sender`), so the tracker run it opens is
the one a later re-run of the name continues, and a second backfill sends nothing twice. It runs in
this process: nothing trains beside it, so it needs no process of its own (`sender.py`)."""

from __future__ import annotations

import argparse
import json

from codistill.config import ConfigError, apply_override, load_config, load_yaml, to_dict
from codistill.records import read_records, summary_text
from codistill.storage import RunStorage
from codistill.tracking import STATE_FILE, Sender, flat_params, writers_of

TRACKERS = ("tensorboard", "mlflow", "wandb")
CONFIG_FILE = "config.yaml"  # the run's resolved config (engine.run.CONFIG_FILE; the engine imports tracking)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run's folder: <storage_path>/<name>")
    p.add_argument("--to", required=True, choices=TRACKERS, help="the tracker to send the run's records to")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a tracking setting, e.g. --set tracking.mlflow.tracking_uri=http://127.0.0.1:5000")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from codistill.lease import RunLease

    storage = RunStorage.at(args.run_dir)
    if not storage.exists(CONFIG_FILE):
        raise ConfigError("", f"{storage.uri} is not a codistill run (no {CONFIG_FILE})")
    holder = RunLease(storage).live_holder()
    if holder:
        raise ConfigError("", f"{storage.uri} is training (host {holder.get('host')}, pid {holder.get('pid')}): its "
                              "own writer sends it; backfill it once it has stopped")
    data = load_yaml(storage.read_bytes(CONFIG_FILE).decode())
    for assignment in args.set or []:
        if not assignment.startswith("tracking."):
            raise ConfigError(assignment.split("=")[0], "only tracking.* settings can be given to `codistill track`")
        apply_override(data, assignment)
    chosen = (data.get("tracking") or {}).get(args.to)
    data["tracking"] = {args.to: chosen if chosen not in (None, False) else True}  # this tracker only
    data["ray"] = {**(data.get("ray") or {}), "storage_path": storage.storage_path}  # wherever the folder is now
    data["name"] = storage.uri.rstrip("/").rsplit("/", 1)[-1]
    cfg = load_config(data)
    table = read_records(storage)
    tracker = Sender(storage, writers_of(cfg, storage), cfg.num_peers, group_rows=bool(storage.list("records/group")))
    tracker.open(flat_params(to_dict(cfg)))
    before = tracker.state[args.to]["sent"]
    tracker.finish(summary_text(table, [p.model for p in cfg.peers]))
    state = json.loads(storage.read_bytes(STATE_FILE))[args.to]
    sent = f"steps {before + 1}..{state['sent']}" if state["sent"] > before else f"nothing new (it holds step {before})"
    ident = state.get("run_id") or state.get("id")
    print(f"{storage.uri} → {args.to}: {sent}" + (f"; its run id {ident}" if ident else ""))
    return 0
