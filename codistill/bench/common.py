"""What every benchmark shares: percentiles, latency rows, printing, the JSON dump, and the
repository's demo config."""

from __future__ import annotations

import json
import os

# The demo config the wall-time benchmark runs: configs/ of this checkout, found from the
# package's own location, not from the working directory.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(REPO, "configs", "dml_mnist1d.yaml")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def latency_row(latencies: list[float]) -> dict:
    return {"p50_ms": 1000 * percentile(latencies, 0.5), "p90_ms": 1000 * percentile(latencies, 0.9)}


def print_latencies(title: str, rows: dict[str, dict], width: int) -> None:
    print(f"\n{title:<{width + 2}}    p50        p90")
    for name, row in rows.items():
        print(f"  {name:<{width}}{row['p50_ms']:>6.2f} ms{row['p90_ms']:>8.2f} ms")


def write_json(path: str | None, figures: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=2)


def paired_ratio(base: list[float], other: list[float], seed: int = 0, resamples: int = 4000) -> dict:
    """other ÷ base from paired blocks (block i of each measured next to the other, in
    alternating order): the median of the per-pair ratios, and a 95% percentile-bootstrap
    interval of that median (the pairs resampled; seeded, so the same blocks give the same
    interval). Pairing cancels the drift of a shared machine; the interval says whether the
    blocks were enough to resolve the difference asked about."""
    import random
    import statistics

    ratios = [o / b for b, o in zip(base, other, strict=True)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return {"ratio": statistics.median(ratios), "low": medians[int(0.025 * resamples)],
            "high": medians[int(0.975 * resamples) - 1], "pairs": len(ratios)}


def ratio_text(r: dict) -> str:
    return f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"
