"""Paired statistics of a comparison: per seed, a method's difference to the baseline on the
same seed; over seeds, the mean with its 95% t-interval and wins k of n."""

from __future__ import annotations

import statistics

# Two-sided 95% quantiles of Student's t by degrees of freedom (1 … 30); beyond, the normal's.
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]
PAIRED = ("mean", "ensemble", "best")


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean over seeds (n ≥ 2; n = 1 gives ±inf)."""
    n, mean = len(values), statistics.mean(values)
    if n < 2:
        return mean, float("-inf"), float("inf")
    half = (T_975[n - 2] if n - 2 < len(T_975) else 1.96) * statistics.stdev(values) / n ** 0.5
    return mean, mean - half, mean + half


def paired_differences(rows: list[dict], baseline: str, figure: str = "last_{}", scale: float = 100,
                       prefix: str = "diff", lower_is_better: bool = False) -> list[dict]:
    """Per method: the per-seed difference to the baseline on the same seed (accuracy at the last
    step in percentage points, by default), their mean with a 95% t-interval over seeds, and
    wins k of n — for the mean member, the ensemble and the best member. Adds `<prefix>_<figure>`
    to each row. Bits per token (`figure="bits_{}", scale=1, prefix="bits_diff",
    lower_is_better=True`): a win is fewer bits."""
    base = {r["seed"]: r for r in rows if r["method"] == baseline}
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r["seed"] in base and figure.format("mean") in r]
        entry = {"method": method, "baseline": baseline, "seeds": len(mine), "prefix": prefix}
        for name in PAIRED:
            key = figure.format(name)
            diffs = [scale * (r[key] - base[r["seed"]][key]) for r in mine]
            for r, d in zip(mine, diffs):
                r[f"{prefix}_{name}"] = d
            if method == baseline or not diffs:
                continue
            mean, low, high = t_interval(diffs)
            entry.update({f"{prefix}_{name}": mean, f"{prefix}_{name}_low": low, f"{prefix}_{name}_high": high,
                          f"{prefix}_wins_{name}": sum((d < 0) if lower_is_better else (d > 0) for d in diffs)})
        if method != baseline:
            summary.append(entry)
    return summary


def resolving_seeds(diffs: list[float], half_width: float = 0.5) -> int | None:
    """Seeds whose t-interval would be ±`half_width` points at this spread (None: no spread yet)."""
    if len(diffs) < 2 or statistics.stdev(diffs) == 0:
        return None
    sd = statistics.stdev(diffs)
    n = 2
    while (T_975[n - 2] if n - 2 < len(T_975) else 1.96) * sd / n ** 0.5 > half_width:
        n += 1
    return n


def difference_text(entry: dict, figure: str, digits: int = 2) -> str:
    prefix = entry.get("prefix", "diff")
    mean, low, high = (entry[f"{prefix}_{figure}{s}"] for s in ("", "_low", "_high"))
    # One seed has no spread, so no interval: never printed as [-inf, +inf], never an effect.
    interval = f"[{low:+.{digits}f}, {high:+.{digits}f}]" if entry["seeds"] > 1 else "[n/a: 1 seed]"
    verdict = "" if entry["seeds"] > 1 and (low > 0 or high < 0) else " (no resolvable effect)"
    return f"{mean:+.{digits}f} {interval} {entry[f'{prefix}_wins_{figure}']}/{entry['seeds']}{verdict}"
