"""`codistill bench noise-scale CONFIG|RUN`: the simple gradient noise scale along training.

B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"):
G is the true gradient of the training loss, Σ the per-example covariance of its gradient. It
predicts the critical batch — below it a doubled batch nearly halves the steps to a target (data
parallelism pays), far above it a doubled batch buys almost nothing. Their Appendix A's unbiased
estimators, from the squared norms of two batch gradients of sizes b < B, since
E|G_b|² = |G|² + tr(Σ)/b:

    |G|²  ≈ (B·|G_B|² − b·|G_b|²) / (B − b)        tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

Each repetition draws both batches afresh; B_simple is the ratio of the two means over the
repetitions (the paper's ratio of averages: the per-repetition ratio is biased, and undefined
when an estimate of |G|² is ≤ 0), its 95% interval a seeded bootstrap over repetitions.

Batches are drawn uniformly *with replacement*, seeded. The batch schedule draws without
replacement, and then E|G_b|² = |G|² + tr(Σ)/b − tr(Σ)/(N − 1) at every b: tr(Σ) still comes
out right, but |G|² is short by tr(Σ)/(N − 1), so B_simple is overestimated by 1/(1 − B_simple/N)
— already 5–10% with MNIST-1D's 4,000 examples at the B_simple measured there, and without bound
once B_simple nears N, as it does late in a data-limited run. With replacement the identity
holds exactly, Σ being the covariance over the training set. The loss is the model's
cross-entropy (no label smoothing, no distillation term); for language models per token,
positions labelled -100 left out, and a batch counted in tokens (windows × positions).

Points along training come from a run's checkpoints (a run folder), or from a fresh run of the
config's peer `--peer` trained alone (`independent`, the project's own `train_step`),
checkpointed at the steps asked in the output folder — which is then a run folder of that
one-peer config: a second call with the same config measures its checkpoints again without
training, and goes on training from the newest one for later steps."""

from __future__ import annotations

import argparse
import io
import json
import os

import torch
import torch.nn.functional as F

from codistill.errors import ConfigError
from codistill.metrics import IGNORE_INDEX

RESAMPLES = 2000
OUT_SUFFIX = ".noise_scale"
TABLE_FILE, PLOT_FILE, JSON_FILE = "noise_scale.md", "noise_scale.png", "noise_scale.json"


# -- the estimator, on any source of batch gradients ----------------------------------------------

def two_batch_estimates(sq_small: torch.Tensor, sq_big: torch.Tensor, small: int, big: int):
    """Per repetition: the unbiased estimates (|G|², tr(Σ)) from |G_small|² and |G_big|²."""
    g2 = (big * sq_big - small * sq_small) / (big - small)
    trace = (sq_small - sq_big) / (1 / small - 1 / big)
    return g2, trace


def ratio_of_means(g2: torch.Tensor, trace: torch.Tensor, seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """B_simple = mean tr(Σ) / mean |G|² with a 95% percentile-bootstrap interval over the
    repetitions (seeded). A resample whose mean |G|² is ≤ 0 has no finite B_simple: it counts as
    +∞ (the gradient's signal lost in its noise), so the upper end may be ∞."""
    def ratio(s, g):
        return torch.where(g > 0, s / g.clamp_min(1e-300), torch.full_like(g, float("inf")))

    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(g2), (resamples, len(g2)), generator=generator)
    boot = ratio(trace[picks].mean(1), g2[picks].mean(1)).sort().values
    return {"b_simple": float(ratio(trace.mean(), g2.mean())), "low": float(boot[int(0.025 * resamples)]),
            "high": float(boot[int(0.975 * resamples) - 1]), "g2": float(g2.mean()), "trace": float(trace.mean()),
            "repeats": len(g2)}


def measure(batch_gradient, small: int, big: int, repeats: int, seed: int = 0) -> dict:
    """The noise scale from `batch_gradient(size, generator)` (the flat gradient of the mean loss
    over a fresh batch of `size`), `repeats` pairs of batches of `small` and `big`."""
    generator = torch.Generator().manual_seed(seed)
    sq = torch.tensor([[float(batch_gradient(size, generator).double().square().sum()) for size in (small, big)]
                       for _ in range(repeats)], dtype=torch.float64)
    return ratio_of_means(*two_batch_estimates(sq[:, 0], sq[:, 1], small, big), seed=seed)


# -- a model's training-loss gradient --------------------------------------------------------------

def model_gradient(model: torch.nn.Module, data, chunk: int):
    """`batch_gradient` of `model` on `data`'s training set: `size` examples (tokens for a
    language model: size ÷ positions windows) drawn uniformly with replacement, in chunks of
    `chunk` examples (the sum of the chunks' losses over the whole batch's count: the same gradient)."""
    positions = data.rows(data.x_train[:1])  # rows of logits an example makes: a window's positions
    params = [p for p in model.parameters() if p.requires_grad]

    def batch_gradient(size: int, generator: torch.Generator) -> torch.Tensor:
        indices = torch.randint(len(data.y_train), (size // positions,), generator=generator)
        x, y = data.train_batch(indices, generator)
        kept = int((y != IGNORE_INDEX).sum())
        model.zero_grad(set_to_none=True)
        for part in range(0, len(indices), chunk):
            xs, ys = x[part:part + chunk], y[part * positions:(part + chunk) * positions]
            (F.cross_entropy(model(xs), ys, ignore_index=IGNORE_INDEX, reduction="sum") / kept).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
        model.zero_grad(set_to_none=True)
        return flat

    return batch_gradient


# -- where the weights come from: a run's checkpoints, or a fresh run of one peer --------------------

def one_peer_config(cfg, peer: int):
    """The config's peer `peer` trained alone on the whole training set, as independent
    training: what a fresh measurement trains."""
    from codistill.config import load_config, to_dict

    data = to_dict(cfg)
    data.update(name=cfg.name + OUT_SUFFIX, peers=[data["peers"][peer]], method={"name": "independent"},
                teacher=None)
    data["data"]["shard"] = False
    return load_config(data)


def fresh_checkpoints(cfg, data, storage, steps: list[int], log) -> None:
    """Train `cfg` (one peer) with the project's `train_step`, writing its checkpoint at each of
    `steps` into `storage`; steps already checkpointed there by the same config are kept, and
    training goes on from the newest one before the last step asked."""
    from codistill.config import dump_config, first_difference, load_config, load_yaml, to_dict
    from codistill.engine.checkpoint import (LOCAL_CHECKPOINT_DIR, LocalCheckpoints, checkpoint_folders,
                                             load_peer_state, meta_state, peer_state)
    from codistill.engine.job import make_job, peer_schedules
    from codistill.engine.loop import train_step
    from codistill.engine.run import CONFIG_FILE

    if storage.exists(CONFIG_FILE):
        stored = to_dict(load_config(load_yaml(storage.read_bytes(CONFIG_FILE).decode())))
        difference = first_difference(to_dict(cfg), stored)
        if difference:
            raise ConfigError("--to", f"{storage.uri} holds checkpoints of another config ({difference[0]}: "
                                      f"{difference[2]!r} there, {difference[1]!r} now); give another --to or "
                                      "--set name=…, or delete that folder")
    storage.write_bytes(CONFIG_FILE, dump_config(cfg).encode())
    have = {step for step, _ in checkpoint_folders(storage, [LOCAL_CHECKPOINT_DIR])}
    wanted = sorted(set(steps) - have)
    if not wanted:
        return
    checkpoints = LocalCheckpoints(storage, keep=0)
    job = make_job(cfg, 0, data, peer_schedules(cfg, len(data.y_train)), torch.device("cpu"), None)
    start = max((s for s in have if s < wanted[-1]), default=0)
    if start:
        load_peer_state(job, checkpoints.load_peer(start, 0))
    log(f"training peer {cfg.peers[0].model} alone from step {start} to {wanted[-1]} "
        f"(checkpoints at {', '.join(map(str, wanted))}) in {storage.uri}")
    for step in range(start, wanted[-1] + 1):
        if step in wanted:
            checkpoints.write_peer(step, 0, peer_state(job, step))
            checkpoints.commit(step, meta_state(step, to_dict(cfg)))
        if step < wanted[-1]:
            train_step(job, step)


def peer_model(cfg, data, state: dict | None, peer: int) -> torch.nn.Module:
    """Peer `peer`'s registered model with a checkpoint's weights, or (`state` None) its initial
    weights, built as `build_peer` builds them (the same seed)."""
    from codistill.engine.checkpoint import registered_model
    from codistill.engine.seeds import init_seed
    from codistill.models import create_model

    spec = cfg.peers[peer]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(cfg.seed, peer))
        model = create_model(spec.model, data.num_classes, **spec.model_args)
    if state is not None:
        model.load_state_dict(registered_model(state, spec.model, dict(spec.model_args))[2])
    return model.train()


# -- the command -----------------------------------------------------------------------------------

def parse_steps(text: str | None, total: int) -> list[int] | None:
    if text is None:
        return None
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ConfigError("--steps", f"is a comma-separated list of steps (e.g. 0,500,1000); got {text!r}") from None
    if not steps or steps[0] < 0 or steps[-1] > total:
        raise ConfigError("--steps", f"are steps in 0..{total} (train.steps); got {text!r}")
    return steps


def default_steps(total: int) -> list[int]:
    """Six points: the start, and a spread weighted early (where the noise scale moves most)."""
    return sorted({0, total // 10, total // 4, total // 2, 3 * total // 4, total})


def _sizes(args, cfg, positions: int, unit: str) -> tuple[int, int]:
    small = args.small or cfg.data.batch_size * positions
    big = args.big or 10 * small
    if small < 1 or big <= small:
        raise ConfigError("--big", f"must be larger than --small, both >= 1 {unit}; got --small {small}, --big {big}")
    for flag, size in (("--small", small), ("--big", big)):
        if size % positions:
            raise ConfigError(flag, f"is in tokens, a multiple of the {positions} positions of a window; got {size}")
    return small, big


def _source(args):
    """(the config whose peer is measured, its run storage, the output storage, whether fresh)."""
    from codistill.config import load_config, load_yaml
    from codistill.engine.run import CONFIG_FILE
    from codistill.storage import RunStorage, resolve_storage_path

    source = args.source or args.config
    if not source:
        raise ConfigError("noise-scale", "needs a config (YAML) or a run folder: codistill bench noise-scale CONFIG")
    if os.path.isdir(source):
        run = RunStorage.at(source)
        if not run.exists(CONFIG_FILE):
            raise ConfigError("noise-scale", f"{source} is a folder but not a codistill run (no {CONFIG_FILE})")
        cfg = load_config(load_yaml(run.read_bytes(CONFIG_FILE).decode()), list(args.set or []))
        return cfg, run, RunStorage.at(args.to or run.uri + OUT_SUFFIX), False
    cfg = load_config(source, list(args.set or []))
    if not 0 <= args.peer < cfg.num_peers:
        raise ConfigError("--peer", f"is a peer of the config, 0..{cfg.num_peers - 1}; got {args.peer}")
    one = one_peer_config(cfg, args.peer)
    out = RunStorage.at(args.to) if args.to else RunStorage(resolve_storage_path(cfg.ray.storage_path), one.name)
    return one, out, out, True


def main(args: argparse.Namespace) -> int:
    from codistill.data import load_data
    from codistill.engine.checkpoint import checkpoint_folders, from_bytes, peer_file
    from codistill.engine.shard_files import with_shards

    if args.repeats < 2:
        raise ConfigError("--repeats", f"is the number of repetitions, >= 2 (an interval needs several); got {args.repeats}")
    cfg, run, out, fresh = _source(args)
    peer = 0 if fresh else args.peer
    if not 0 <= peer < cfg.num_peers:
        raise ConfigError("--peer", f"is a peer of the run, 0..{cfg.num_peers - 1}; got {peer}")
    steps = parse_steps(args.steps, cfg.train.steps)
    data = load_data(cfg.data)
    positions = data.rows(data.x_train[:1])  # a language model's batch is counted in tokens
    unit = data.task.row_unit
    small, big = _sizes(args, cfg, positions, unit)
    if fresh:
        fresh_checkpoints(cfg, data, run, steps or default_steps(cfg.train.steps), lambda text: print(text, flush=True))
    folders = dict(checkpoint_folders(run))
    if steps is None:
        steps = sorted({0, *folders})
    missing = [s for s in steps if s and s not in folders]
    if missing:
        raise ConfigError("--steps", f"{missing} have no checkpoint in {run.uri}; it has {sorted(folders) or 'none'} "
                                     "(and 0, the initial weights)")
    print(f"# codistill bench noise-scale — peer {peer} ({cfg.peers[peer].model}) of {cfg.name}, "
          f"{len(data.y_train)} training {'windows' if positions > 1 else 'examples'}; B_simple in {unit}, from batches of "
          f"{small} and {big} {unit} drawn with replacement, {args.repeats} repetitions, 95% bootstrap interval",
          flush=True)
    rows = []
    for step in steps:
        state = (with_shards(from_bytes(run.read_bytes(f"{folders[step]}/{peer_file(peer)}")), f"{run.uri}/{folders[step]}")
                 if step else None)
        model = peer_model(cfg, data, state, peer)
        row = measure(model_gradient(model, data, chunk=max(1, 4096 // positions)), small, big, args.repeats,
                      seed=cfg.seed)
        rows.append({"step": step, **row})
        print(row_text(rows[-1]), flush=True)
    table = table_text(rows, unit)
    figures = {"config": cfg.name, "peer": peer, "model": cfg.peers[peer].model, "unit": unit, "small": small,
               "big": big, "repeats": args.repeats, "rows": rows}
    out.write_bytes(TABLE_FILE, table.encode())
    out.write_bytes(JSON_FILE, json.dumps(figures, indent=2).encode())
    out.write_bytes(PLOT_FILE, plot_png(rows, unit, cfg.name))
    print("\n" + table)
    print(f"table: {out.path(TABLE_FILE)}\nplot:  {out.path(PLOT_FILE)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


def _number(value: float) -> str:
    return "∞" if value == float("inf") else f"{value:.3g}"


def row_text(row: dict) -> str:
    return (f"| {row['step']} | {_number(row['b_simple'])} | [{_number(row['low'])}, {_number(row['high'])}] | "
            f"{row['g2']:.4g} | {row['trace']:.4g} |")


def table_text(rows: list[dict], unit: str) -> str:
    return "\n".join([f"| step | B_simple ({unit}) | 95% interval | \\|G\\|² | tr(Σ) |", "|---|---|---|---|---|",
                      *(row_text(r) for r in rows)]) + "\n"


def plot_png(rows: list[dict], unit: str, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in rows if r["b_simple"] > 0 and r["b_simple"] != float("inf")]
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in finite]
    mid = [r["b_simple"] for r in finite]
    low = [m - max(r["low"], 1e-12) for m, r in zip(mid, finite)]
    high = [min(r["high"], 1e12) - m for m, r in zip(mid, finite)]
    ax.errorbar(steps, mid, yerr=[low, high], fmt="o-", capsize=3)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"B_simple ({unit})")
    ax.set_title(f"{title}\ngradient noise scale, 95% interval", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
