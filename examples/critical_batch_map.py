"""The critical-batch map (issue 40; docs/comparing.md): for each comparison of one per-peer batch,
the steps-to-target ratio of an arm ÷ the one data-parallel model (per seed, and its geometric
mean with a 95% interval), against the per-peer batch ÷ B_simple — the gradient noise scale of
the data-parallel model where it reaches the target, from `codistill bench noise-scale RUN_FOLDER`
on its own checkpoints (the folder `<run>.noise_scale` it writes).

    python examples/critical_batch_map.py runs/critical_b100 runs/critical_b1600 runs/critical_b6400 \\
        --arm codistill --arm independent --target 0.94 --out docs/critical_batch_map.png

Each comparison folder is a `codistill compare` output (its `compare.parquet`). `--target Q`
recomputes every cell's first evaluation at or past Q from the curves the table keeps (no cell is
trained again); without it, each comparison's own target (`compare`'s default: the data-parallel
arm's own final quality, which may differ between batches). B_simple is read at the data-parallel
cells' mean step to the target, log-linearly between the steps it was measured at (a noise scale
grows roughly geometrically in between); where that model never reached it, at its last measured
step. A seed the data-parallel model reached the target on and the arm did not is drawn as an
open triangle at its lower bound (the arm's last step ÷ the baseline's step): it is left out of
the mean, which would otherwise hide it. A comparison whose data-parallel cells have no
noise-scale measurement is drawn against the per-peer batch alone, and said so. Prints the rows
it drew.
"""

import argparse
import bisect
import json
import math
import os
import statistics
import sys

import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from codistill.experiments.paired import t_interval  # noqa: E402
from codistill.experiments.speed import reach  # noqa: E402


def b_simple_at(measured: list[dict], step: float | None) -> float:
    """B_simple at `step`, log-linear between the measured steps (the last one's for None)."""
    measured = sorted(measured, key=lambda r: r["step"])
    steps = [r["step"] for r in measured]
    if step is None or step >= steps[-1]:
        return measured[-1]["b_simple"]
    if step <= steps[0]:
        return measured[0]["b_simple"]
    i = bisect.bisect_right(steps, step)
    (s0, b0), (s1, b1) = ((r["step"], r["b_simple"]) for r in measured[i - 1:i + 1])
    return math.exp(math.log(b0) + (step - s0) / (s1 - s0) * (math.log(b1) - math.log(b0)))


def comparison_row(folder: str, arm: str, baseline: str, target: float | None = None) -> dict:
    rows = pq.read_table(os.path.join(folder, "compare.parquet")).to_pylist()
    if target is not None:
        reach(rows, target)
    mine = {r["seed"]: r for r in rows if r["method"].split(":")[0] == arm}
    base = {r["seed"]: r for r in rows if r["method"] == baseline}
    if not mine or not base:
        raise SystemExit(f"{folder}: no {arm!r} or {baseline!r} rows in its compare.parquet")
    paired = [s for s in sorted(mine) if s in base and base[s]["target_step"]]
    ratios = [mine[s]["target_step"] / base[s]["target_step"] for s in paired if mine[s]["target_step"]]
    # Not reached by the arm: at least its last step's worth (the last evaluation fell short).
    censored = [max(mine[s].get("curve_step") or [mine[s].get("last_step") or 0]) / base[s]["target_step"]
                for s in paired if not mine[s]["target_step"]]
    batch = next(iter(mine.values()))["examples_per_step"]  # one peer's batch
    reached = [base[s]["target_step"] for s in base if base[s]["target_step"]]
    where = statistics.mean(reached) if reached else None
    noise = []
    for seed in sorted(base):
        path = os.path.join(os.path.dirname(folder.rstrip("/")), base[seed]["run"] + ".noise_scale", "noise_scale.json")
        if os.path.exists(path):
            with open(path) as f:
                noise.append(b_simple_at(json.load(f)["rows"], where))
    row = {"folder": folder, "arm": arm, "batch": batch, "ratios": ratios, "censored": censored, "seeds": len(mine),
           "b_simple": statistics.mean(noise) if noise else None, "b_simple_step": where}
    if ratios:
        mean, low, high = t_interval([math.log(r) for r in ratios])
        row.update(ratio=math.exp(mean), low=math.exp(low), high=math.exp(high))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--arm", action="append", help="a method compared (its name before any ':'); repeatable; "
                        "default codistill")
    parser.add_argument("--baseline", default="data_parallel")
    parser.add_argument("--target", type=float, help="one target quality for every comparison (accuracy as a fraction)")
    parser.add_argument("--out", default="critical_batch_map.png")
    args = parser.parse_args()
    arms = args.arm or ["codistill"]
    rows = [comparison_row(f, arm, args.baseline, args.target) for arm in arms for f in args.folders]
    scaled = all(r["b_simple"] for r in rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, arm in enumerate(arms):
        color, mine = f"C{k}", [r for r in rows if r["arm"] == arm]
        xs = [r["batch"] / r["b_simple"] if scaled else r["batch"] for r in mine]
        shift = 1.0 + 0.04 * (k - (len(arms) - 1) / 2)  # arms side by side at one batch
        ax.errorbar([], [], fmt="o", color=color, capsize=3, label=arm)
        line = []
        for x, r in zip(xs, mine):
            ax.scatter([x * shift] * len(r["ratios"]), r["ratios"], color=color, alpha=0.35, s=12)
            ax.scatter([x * shift] * len(r["censored"]), r["censored"], marker="^", facecolors="none",
                       edgecolors=color, s=30)
            if "ratio" in r:
                line.append((x * shift, r["ratio"]))
                low, high = max(r["low"], 1e-3), min(r["high"], 1e3)
                ax.errorbar([x * shift], [r["ratio"]], yerr=[[r["ratio"] - low], [high - r["ratio"]]], fmt="o",
                            color=color, capsize=3)
            noise = f"{r['b_simple']:,.0f}" if r["b_simple"] else "—"
            at = f" at step {r['b_simple_step']:.0f}" if r["b_simple_step"] else ""
            short = f" (not reached: ≥ {', '.join(f'{v:.2f}' for v in r['censored'])})" if r["censored"] else ""
            mean = f", geometric mean {r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}]" if "ratio" in r else ""
            print(f"{r['folder']} {arm}: per-peer batch {r['batch']}, B_simple {noise}{at}, ratios "
                  f"{', '.join(f'{v:.2f}' for v in r['ratios']) or '—'} of {r['seeds']} seeds{short}{mean}")
        if len(line) > 1:
            ax.plot(*zip(*sorted(line)), color=color, lw=0.8, alpha=0.6)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    ax.set_xlabel("per-peer batch ÷ B_simple" if scaled else "per-peer batch (no B_simple measured)")
    ax.set_ylabel(f"steps to {'the target' if args.target is None else f'{args.target:.0%}'}, arm ÷ {args.baseline}")
    ax.set_title("below 1: the arm reaches the target in fewer steps than one model on its workers", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"map: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
