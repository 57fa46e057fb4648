"""Churn between retrainings (Anil et al. 2018, §4.3): how often two trainings of one arm from
different seeds disagree on a test example's top-1 class — the instability a retrained model
brings to what it replaces. Anil et al. measured it on one model against the codistilled
peers; `compare` measures it for every arm whose members are separate models (the one
data-parallel model, independent or codistilled peers), from each cell's final checkpoint.

For seeds s ≠ s' of one arm, with members i of s and j of s' (the peers; the one model is one
member):

    churn(s, s') = mean over (i, j) of  (1/N) Σ_n [argmax f_i^s(x_n) ≠ argmax f_j^{s'}(x_n)]

over the N test examples. The arm's figure is the mean over its n(n-1)/2 seed pairs: a
U-statistic. The pairs share seeds, so a t-interval over pairs would be too narrow; the 95%
interval is the jackknife's over seeds instead (leave one seed out and take the mean of the
pairs left; variance (n-1)/n · Σ (θ_-k − θ̄)², with Student's t at n−1 degrees of freedom;
n ≥ 3 seeds). The paired difference to the baseline arm is the same statistic of the per-pair
differences churn_arm(s, s') − churn_baseline(s, s') over the seeds both ran — paired as
every other figure of a comparison is. With 3 seeds the jackknife has 2 degrees of freedom:
an interval that is wide, not one that pretends.
"""

from __future__ import annotations

import itertools
import statistics

import torch

from codistill.experiments.paired import T_975

MIN_SEEDS = 3  # the jackknife leaves one out and needs a pair left


@torch.no_grad()
def final_predictions(cfg, storage, data) -> torch.Tensor:
    """(members, test examples): each peer's top-1 test class from the cell's checkpoint at its
    last step, each peer rebuilt as the registered model its file names."""
    from codistill.engine.checkpoint import checkpoint_folders, newest_loadable, registered_model
    from codistill.models import create_model

    folders = [(step, folder) for step, folder in checkpoint_folders(storage) if step == cfg.train.steps]
    found = newest_loadable(storage, folders, cfg.num_peers)
    if found is None:
        raise FileNotFoundError(f"{storage.uri} has no loadable checkpoint at its last step {cfg.train.steps}")
    predictions = []
    for state in found[1]:
        name, args, weights = registered_model(state)
        model = create_model(name, data.num_classes, **args)
        model.load_state_dict(weights)
        model.eval()
        top = [model(x).argmax(-1) for x, _ in data.test_batches(1000)]
        predictions.append(torch.cat(top))
    return torch.stack(predictions)


def pair_churn(a: torch.Tensor, b: torch.Tensor) -> float:
    """churn(s, s'): the mean over members i of `a`, j of `b` of the share of test examples their
    top-1 classes differ on."""
    return (a[:, None, :] != b[None, :, :]).float().mean().item()


def pairwise(predictions: dict[int, torch.Tensor]) -> dict[tuple[int, int], float]:
    """churn(s, s') for every pair of seeds s < s'."""
    return {(s, t): pair_churn(predictions[s], predictions[t]) for s, t in itertools.combinations(sorted(predictions), 2)}


def jackknife(pairs: dict[tuple[int, int], float]) -> tuple[float, float, float]:
    """(mean over the pairs, 95% low, 95% high): the jackknife over seeds of the pairs' mean;
    ±inf with fewer than `MIN_SEEDS` seeds."""
    seeds = sorted({s for pair in pairs for s in pair})
    mean = statistics.mean(pairs.values())
    n = len(seeds)
    if n < MIN_SEEDS:
        return mean, float("-inf"), float("inf")
    left_out = [statistics.mean(v for pair, v in pairs.items() if k not in pair) for k in seeds]
    centre = statistics.mean(left_out)
    half = (T_975[n - 2] if n - 2 < len(T_975) else 1.96) * ((n - 1) / n * sum((x - centre) ** 2 for x in left_out)) ** 0.5
    return mean, mean - half, mean + half


def retraining_churn(predictions: dict[str, dict[int, torch.Tensor]], baseline: str) -> list[dict]:
    """Per arm (`predictions`: arm → seed → (members, N) top-1 classes): its churn between
    retrainings with the jackknife interval, and the paired difference to `baseline` over the
    seed pairs both have (fractions of the test set)."""
    base = pairwise(predictions[baseline]) if baseline in predictions else {}
    summary = []
    for arm, by_seed in predictions.items():
        pairs = pairwise(by_seed)
        if not pairs:
            continue
        entry = {"method": arm, "seeds": len(by_seed), "members": int(next(iter(by_seed.values())).shape[0])}
        entry["churn"], entry["low"], entry["high"] = jackknife(pairs)
        shared = {pair: v - base[pair] for pair, v in pairs.items() if pair in base}
        if arm != baseline and shared:
            entry["diff"], entry["diff_low"], entry["diff_high"] = jackknife(shared)
        summary.append(entry)
    return summary


def markdown_section(summary: list[dict], baseline: str) -> list[str]:
    def interval(low: float, high: float, seeds: int, sign: str = "+") -> str:
        return f"[{100 * low:{sign}.2f}, {100 * high:{sign}.2f}]" if seeds >= MIN_SEEDS else f"[n/a: {seeds} seeds]"

    lines = ["", "**churn between retrainings** (%: the share of test examples on which two trainings of one arm from "
             "different seeds disagree, mean over seed pairs and over their members' pairs; the one model is one "
             f"member; 95% jackknife interval over seeds; paired difference to {baseline} over the same seed pairs; "
             "an interval that includes 0 is no resolvable effect)", "",
             f"| method | members | seeds | churn between retrainings | − {baseline} |", "|---|---|---|---|---|"]
    for e in summary:
        if "diff" in e:
            resolved = e["seeds"] >= MIN_SEEDS and (e["diff_low"] > 0 or e["diff_high"] < 0)
            diff = (f"{100 * e['diff']:+.2f} {interval(e['diff_low'], e['diff_high'], e['seeds'])}"
                    + ("" if resolved else " (no resolvable effect)"))
        else:
            diff = "(baseline)" if e["method"] == baseline else "—"
        churn = f"{100 * e['churn']:.2f} {interval(e['low'], e['high'], e['seeds'], sign='')}"
        lines.append(f"| {e['method']} | {e['members']} | {e['seeds']} | {churn} | {diff} |")
    return lines
