"""The critical-batch map (issue 40; docs/comparing.md): for each comparison of one per-peer batch,
the steps-to-target ratio codistillation ÷ the one data-parallel model (per seed, and its geometric
mean with a 95% interval), against the per-peer batch ÷ B_simple — the gradient noise scale of
the data-parallel model where the target is reached, measured on its own final checkpoint by
`codistill bench noise-scale RUN_FOLDER` (the folder `<run>.noise_scale` it writes).

    python examples/critical_batch_map.py runs/critical_b100 runs/critical_b400 runs/critical_b1600 \\
        runs/critical_b6400 --arm codistill --out docs/critical_batch_map.png

Each comparison folder is a `codistill compare` output (its `compare.parquet`); a comparison whose
data-parallel cell has no noise-scale measurement is drawn against the per-peer batch alone and
said so. Prints the rows it drew.
"""

import argparse
import json
import math
import os
import statistics
import sys

import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from codistill.experiments.paired import t_interval  # noqa: E402


def comparison_row(folder: str, arm: str, baseline: str) -> dict:
    rows = pq.read_table(os.path.join(folder, "compare.parquet")).to_pylist()
    mine = {r["seed"]: r for r in rows if r["method"].split(":")[0] == arm}
    base = {r["seed"]: r for r in rows if r["method"] == baseline}
    if not mine or not base:
        raise SystemExit(f"{folder}: no {arm!r} or {baseline!r} rows in its compare.parquet")
    ratios = [mine[s]["target_step"] / base[s]["target_step"] for s in sorted(mine)
              if s in base and mine[s]["target_step"] and base[s]["target_step"]]
    batch = next(iter(mine.values()))["examples_per_step"]  # one peer's batch
    noise = []
    for seed in sorted(base):
        path = os.path.join(os.path.dirname(folder.rstrip("/")), base[seed]["run"] + ".noise_scale", "noise_scale.json")
        if os.path.exists(path):
            with open(path) as f:
                measured = json.load(f)["rows"]
            noise.append(max(measured, key=lambda r: r["step"])["b_simple"])
    row = {"folder": folder, "batch": batch, "ratios": ratios, "seeds": len(mine),
           "b_simple": statistics.mean(noise) if noise else None}
    if ratios:
        mean, low, high = t_interval([math.log(r) for r in ratios])
        row.update(ratio=math.exp(mean), low=math.exp(low), high=math.exp(high))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--arm", default="codistill", help="the method compared (its name before any ':')")
    parser.add_argument("--baseline", default="data_parallel")
    parser.add_argument("--out", default="critical_batch_map.png")
    args = parser.parse_args()
    rows = [comparison_row(f, args.arm, args.baseline) for f in args.folders]
    scaled = all(r["b_simple"] for r in rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        x = r["batch"] / r["b_simple"] if scaled else r["batch"]
        ax.scatter([x] * len(r["ratios"]), r["ratios"], color="0.6", s=12)
        if "ratio" in r:
            low, high = max(r["low"], 1e-3), min(r["high"], 1e3)
            ax.errorbar([x], [r["ratio"]], yerr=[[r["ratio"] - low], [high - r["ratio"]]], fmt="o", color="C0", capsize=3)
        print(f"{r['folder']}: per-peer batch {r['batch']}, B_simple {r['b_simple'] or '—'}, ratios "
              f"{', '.join(f'{v:.2f}' for v in r['ratios']) or '—'} of {r['seeds']} seeds"
              + (f", geometric mean {r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}]" if "ratio" in r else ""))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("per-peer batch ÷ B_simple" if scaled else "per-peer batch (no B_simple measured)")
    ax.set_ylabel(f"steps to target, {args.arm} ÷ {args.baseline}")
    ax.set_title("below 1: codistillation reaches the target in fewer steps")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"map: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
