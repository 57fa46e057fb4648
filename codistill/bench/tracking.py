"""`codistill bench tracking`: what sending a run to every tracker costs its steps.

Whole runs of the config (the local runner, `--block` steps each) with tracking off and with
every tracker on — TensorBoard, MLflow against a local server this benchmark starts (or
`--set tracking.mlflow.tracking_uri=…`), W&B offline — one of each per round, the order
alternating (ABBA), each in a fresh run folder, after a warm-up pair (the data set's cache, the
tracker writer's fork server, W&B's first service start, the server's first run). A run's step
time is the mean of its records' `step_ms` over both peers' steps: the loop's own clock around
each update (data, forward, exchange, backward, optimizer; not evaluations, not checkpoint writes).
The tracker writer is a process of its own at nice 19 (`tracking/sender.py`), so what it costs a
step is what it still takes from the peers while they train. The MLflow server this benchmark
starts runs at nice 19 too: it stands in for a tracking server on another machine, whose CPU
the steps would not share (a `--set tracking.mlflow.tracking_uri` server is whatever it is).
Reported: tracked ÷ off as the median of the per-round ratios with a bootstrap interval
(`paired_ratio`), and the same for the whole run's wall time, which also holds what a run pays
once: opening the tracker runs (the writer's process, W&B's service) before the first step, and
waiting at the end for the writer to send the last records and the artifacts. Every tracked run
is checked to have sent every step to every tracker, so a tracker that silently sent nothing
cannot pass for a cheap one."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time

from codistill.bench.common import DEMO_CONFIG, paired_ratio, ratio_text, write_json
from codistill.bench.mlflow_server import mlflow_server, server_command
from codistill.config import load_config
from codistill.errors import ConfigError

# A livelier tracker than the demo's defaults (a checkpoint every 1,000 steps): the writer sends
# at every checkpoint, so it works 6× per run here. `--set` overrides these.
RUN = ["train.eval_every=100", "train.checkpoint_every=50"]
TRACKED = ["tracking.tensorboard=true", "tracking.mlflow.experiment=codistill-bench",
           "tracking.wandb.mode=offline", "tracking.wandb.project=codistill-bench"]


def _one_run(config: str, sets: list[str], folder: str, name: str, steps: int) -> tuple[float, float]:
    """(mean step_ms over both peers' steps, wall seconds) of one run trained to `steps`."""
    from codistill.engine.run import train

    cfg = load_config(config, [*RUN, *sets, f"name={name}", f"ray.storage_path={folder}", f"train.steps={steps}"])
    started = time.perf_counter()
    result = train(cfg, "local")
    wall = time.perf_counter() - started
    rows = [r for r in result.records.to_pylist() if r["split"] == "train"]
    if cfg.tracking.trackers:
        sent = json.loads(result.storage.read_bytes("tracking/state.json"))
        short = {t: sent.get(t, {}).get("sent") for t in cfg.tracking.trackers if sent.get(t, {}).get("sent") != steps}
        if short:
            raise RuntimeError(f"run {name}: a tracker was not sent every step (last step sent: {short})")
    return statistics.fmean(r["step_ms"] for r in rows), wall


def main(args: argparse.Namespace) -> int:
    config = args.config or DEMO_CONFIG
    # `--set tracking.…` is for the tracked arm only (a tracking.mlflow key turns MLflow on).
    sets = [s for s in args.set or [] if not s.startswith("tracking.")]
    given = [s for s in args.set or [] if s.startswith("tracking.")]
    given_uri = any(s.startswith("tracking.mlflow.tracking_uri=") for s in given)
    command = None if given_uri else server_command()
    if not given_uri and command is None:
        raise ConfigError("tracking.mlflow.tracking_uri", "no MLflow server to send to: give one with --set "
                          "tracking.mlflow.tracking_uri=http://…, or install one (`make test` makes .venv-mlflow; "
                          "or point CODISTILL_MLFLOW_SERVER at an `mlflow` command)")
    load_config(config, [*RUN, *sets, *TRACKED, *given])  # a wrong --set is one line before anything starts
    cfg = load_config(config, sets)
    models = ", ".join(sorted({p.model for p in cfg.peers}))
    print(f"# codistill bench tracking — {cfg.num_peers} × {models}, method {cfg.method.name}, local runner; "
          f"{args.rounds} rounds of one {args.block}-step run tracking off and one with TensorBoard, MLflow "
          f"({'the given server' if given_uri else 'a local server at nice 19'}) and W&B offline, ABBA order", flush=True)
    arms: dict[str, dict[str, list[float]]] = {arm: {"step_ms": [], "wall_s": []} for arm in ("off", "on")}
    with tempfile.TemporaryDirectory(prefix="codistill-bench-tracking-") as folder:
        with (contextlib.nullcontext(None) if given_uri else mlflow_server(folder, command, nice=True)) as uri:
            tracked = [*TRACKED, *given, *([] if uri is None else [f"tracking.mlflow.tracking_uri={uri}"])]
            runs = os.path.join(folder, "runs")
            for arm in ("off", "on"):  # warm-up: the data set's cache, W&B's service, the server's first run
                _one_run(config, [*sets, *(tracked if arm == "on" else [])], runs, f"warmup_{arm}", 20)
            for r in range(args.rounds):
                for arm in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    step_ms, wall = _one_run(config, [*sets, *(tracked if arm == "on" else [])], runs,
                                             f"round{r}_{arm}", args.block)
                    arms[arm]["step_ms"].append(step_ms)
                    arms[arm]["wall_s"].append(wall)
                    print(f"  round {r} {arm:>3}: {step_ms:6.2f} ms a step, {wall:5.1f} s the run", flush=True)
    figures = {"config": config, "steps_per_run": args.block, "rounds": args.rounds, "arms": arms,
               "step_time_on_over_off": paired_ratio(arms["off"]["step_ms"], arms["on"]["step_ms"]),
               "wall_time_on_over_off": paired_ratio(arms["off"]["wall_s"], arms["on"]["wall_s"])}
    print(f"\nstep time, every tracker on ÷ off [95% CI]: {ratio_text(figures['step_time_on_over_off'])} "
          f"(median step {statistics.median(arms['off']['step_ms']):.2f} ms off, "
          f"{statistics.median(arms['on']['step_ms']):.2f} ms on)")
    print(f"the run's wall time, on ÷ off [95% CI]:     {ratio_text(figures['wall_time_on_over_off'])} "
          "(incl. opening the tracker runs and the artifacts at the end)")
    write_json(args.out, figures)
    return 0
