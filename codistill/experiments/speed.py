"""How fast, not only how good: each cell's test metric against steps, examples seen and
seconds (its curve), and the steps, examples and seconds each cell took to reach a target —
by default the `data_parallel` arm's own final quality — with the paired difference in
steps-to-target to the baseline and its 95% interval.

- The metric is the task's score (`metrics.Score`, which its test records name): the group's
  mean member accuracy for classes (higher is better), the peers' mean bits per token for next
  tokens (lower is better).
- Examples: per model, steps × the model's batch; in total, × the models that train (K peers,
  or the one `data_parallel` model whose batch is the K peers' together: the same total).
- Seconds: training time, the sum of the slowest model's step times up to that step
  (evaluations and checkpoints not counted, and a run interrupted and resumed is not charged
  for the time it was away). Measured on the machine that ran the cell: a figure of that
  machine and runner, not of the method alone.
- A cell that never reaches the target is reported as such (not dropped); the paired
  difference is taken over the seeds where both it and the baseline reached it, and says so.
- The step ratio arm ÷ baseline (Anil et al.'s figure: "2× as fast" is a ratio of steps) is the
  geometric mean over those seeds of each seed's ratio, with the 95% t-interval of the log
  ratios taken back. A seed where only one of the two reached the target has no ratio; the
  table says how many seeds each side reached alone, because such a seed favours the side that
  reached it (its ratio is past what the run could show), and the ratio over the others would
  hide it.
"""

from __future__ import annotations

import math
import statistics

from codistill.experiments.paired import t_interval
from codistill.metrics import ACCURACY, SCORES, score_of


def curve(records: list[dict], batch_size: int, models: int) -> dict:
    """The run's test metric at each evaluation, with the steps, examples and seconds behind it."""
    tests = [r for r in records if r["split"] == "test"]
    score = score_of(tests[0]) if tests else ACCURACY
    steps = sorted({r["step"] for r in tests})
    if score is ACCURACY:  # the group's mean member: the peers, or one network's branches
        by_step = {r["step"]: r for r in tests if r["peer"] == 0}
        metric = [by_step[s]["member_mean_accuracy"] for s in steps]
    else:  # the task's own score (bits per token): the peers' mean
        metric = [statistics.mean(r[score.name] for r in tests if r["step"] == s) for s in steps]
    # Seconds: each model's cumulative step time; the group is as far as its slowest model.
    per_peer: dict[int, dict[int, float]] = {}
    for r in sorted((r for r in records if r["split"] == "train" and r.get("step_ms") is not None),
                    key=lambda r: r["step"]):
        done = per_peer.setdefault(r["peer"], {})
        done[r["step"]] = done.get(r["step"] - 1, 0.0) + r["step_ms"] / 1000
    seconds = [max((done.get(s, max(done.values(), default=0.0)) for done in per_peer.values()), default=0.0)
               for s in steps]
    return {"curve_step": steps, "curve_metric": metric, "curve_seconds": seconds,
            "curve_score": score.name, "examples_per_step": batch_size, "models": models}


def default_target(rows: list[dict], arm: str) -> float | None:
    """`arm`'s own final quality: the mean over its seeds of its last metric."""
    mine = [r["curve_metric"][-1] for r in rows if r["method"] == arm and r.get("curve_metric")]
    return statistics.mean(mine) if mine else None


def reach(rows: list[dict], target: float) -> None:
    """Adds to each row the step, examples (per model, total) and seconds of its first
    evaluation at or past `target` (None: never reached)."""
    for r in rows:
        score = SCORES[r["curve_score"]]
        hit = next((i for i, m in enumerate(r["curve_metric"]) if score.better(m, target)), None)
        step = r["curve_step"][hit] if hit is not None else None
        r["target_step"] = step
        r["target_seconds"] = r["curve_seconds"][hit] if hit is not None else None
        r["target_examples_per_model"] = step * r["examples_per_step"] if step is not None else None
        r["target_examples_total"] = step * r["examples_per_step"] * r["models"] if step is not None else None


def paired_steps(rows: list[dict], baseline: str) -> list[dict]:
    """Per method: seeds that reached the target, and its steps-to-target minus the baseline's
    on the same seed (mean, 95% t-interval, over the seeds where both reached it)."""
    base = {r["seed"]: r for r in rows if r["method"] == baseline}
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        entry = {"method": method, "seeds": len(mine), "reached": sum(r["target_step"] is not None for r in mine)}
        both = [(r["target_step"], base[r["seed"]]["target_step"]) for r in mine
                if r["target_step"] is not None and r["seed"] in base and base[r["seed"]]["target_step"] is not None]
        entry["paired"] = len(both)
        if method != baseline and both:
            entry["diff"], entry["low"], entry["high"] = t_interval([arm - of_base for arm, of_base in both])
            logs = [math.log(arm / of_base) for arm, of_base in both]
            entry["ratio"], entry["ratio_low"], entry["ratio_high"] = (math.exp(v) for v in t_interval(logs))
        if method != baseline:
            reached = {r["seed"]: r["target_step"] is not None for r in mine if r["seed"] in base}
            base_reached = {s: base[s]["target_step"] is not None for s in reached}
            entry["only_arm"] = sum(reached[s] and not base_reached[s] for s in reached)
            entry["only_baseline"] = sum(base_reached[s] and not reached[s] for s in reached)
        summary.append(entry)
    return summary


def _mean_std(values: list, digits: int = 0, scale: float = 1.0) -> str:
    values = [scale * v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:,.{digits}f}"
    return f"{statistics.mean(values):,.{digits}f} ± {statistics.stdev(values):,.{digits}f}"


def markdown_section(rows: list[dict], target: float, source: str, baseline: str) -> list[str]:
    score = SCORES[rows[0]["curve_score"]]
    shown = (f"{target:.3f} {score.label}" if score is not ACCURACY else
             f"{100 * target:.2f}% mean member accuracy")
    lines = ["", f"**steps to reach {shown}** ({source}; the first evaluation at or past it; mean ± std over the "
             f"seeds that reached it; paired difference in steps to {baseline}: mean [95% t-interval] over the "
             "seeds where both reached it; seconds: training time on the machine that ran the cells)", "",
             "| method | reached | steps | examples per model | examples in total | seconds | steps − "
             f"{baseline} | steps ÷ {baseline} (geometric mean [95% interval]) | reached it alone: this arm, "
             f"{baseline} |", "|---|---|---|---|---|---|---|---|---|"]
    for entry in paired_steps(rows, baseline):
        mine = [r for r in rows if r["method"] == entry["method"]]
        if entry["method"] == baseline:
            paired = "(baseline)"
        elif "diff" in entry:
            interval = (f"[{entry['low']:+,.0f}, {entry['high']:+,.0f}]" if entry["paired"] > 1 else "[n/a: 1 seed]")
            resolved = entry["paired"] > 1 and (entry["low"] > 0 or entry["high"] < 0)
            paired = (f"{entry['diff']:+,.0f} {interval} over {entry['paired']} seeds"
                      + ("" if resolved else " (no resolvable effect)"))
        else:
            paired = "— (no seed where both reached it)"
        cells = [_mean_std([r[k] for r in mine], 1 if k == "target_seconds" else 0)
                 for k in ("target_step", "target_examples_per_model", "target_examples_total", "target_seconds")]
        if "ratio" in entry:
            resolved = entry["paired"] > 1 and (entry["ratio_low"] > 1 or entry["ratio_high"] < 1)
            ratio = (f"{entry['ratio']:.2f}× " + (f"[{entry['ratio_low']:.2f}, {entry['ratio_high']:.2f}]"
                                                    if entry["paired"] > 1 else "[n/a: 1 seed]")
                     + ("" if resolved else " (no resolvable effect)"))
        else:
            ratio = "(baseline)" if entry["method"] == baseline else "—"
        alone = f"{entry['only_arm']}, {entry['only_baseline']}" if "only_arm" in entry else "—"
        lines.append(f"| {entry['method']} | {entry['reached']}/{entry['seeds']} | {' | '.join(cells)} | {paired} | "
                     f"{ratio} | {alone} |")
    return lines


def plot_curves(axes, rows: list[dict], target: float | None) -> None:
    """Three panels: the metric against steps, examples in total and seconds; per method the
    mean over seeds at each evaluation with a band from the lowest to the highest seed."""
    score = SCORES[rows[0]["curve_score"]]
    scale = score.scale
    for k, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = [r for r in rows if r["method"] == method]
        steps = mine[0]["curve_step"]
        if any(r["curve_step"] != steps for r in mine):
            continue  # seeds evaluated at other steps (cannot be averaged point by point)
        values = [[scale * r["curve_metric"][i] for r in mine] for i in range(len(steps))]
        mean = [statistics.mean(v) for v in values]
        low, high = [min(v) for v in values], [max(v) for v in values]
        xs = (steps, [s * mine[0]["examples_per_step"] * mine[0]["models"] for s in steps],
              [statistics.mean(r["curve_seconds"][i] for r in mine) for i in range(len(steps))])
        for ax, x in zip(axes, xs):
            ax.plot(x, mean, color=f"C{k}", label=method)
            ax.fill_between(x, low, high, color=f"C{k}", alpha=0.2)
    for ax, label in zip(axes, ("steps", "examples seen in total", "training seconds (this machine)")):
        ax.set_xlabel(label)
        ax.set_ylabel(score.title)
        if target is not None:
            ax.axhline(scale * target, color="black", linewidth=0.8, linestyle="--")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
