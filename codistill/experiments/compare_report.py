"""The report of a comparison: `compare.md` (the paired differences, what tuning bought, the
figures at the last step and at the best evaluation, bits per token) and `compare.png`."""

from __future__ import annotations

import io
import json
import statistics

from codistill.config import ExperimentConfig
from codistill.experiments import speed
from codistill.experiments.cells import FIGURES, TUNE_SEEDS
from codistill.experiments.paired import PAIRED, difference_text, paired_differences, resolving_seeds
from codistill.metrics import ACCURACY, score_of
from codistill.storage import RunStorage

MARKDOWN_FILE, PLOT_FILE = "compare.md", "compare.png"


def mean_std(values: list[float], scale: float = 100, digits: int = 2) -> str:
    """Mean ± sample std over seeds (accuracies as %; bits per token unscaled, 3 digits)."""
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _tuned_text(tuned: str) -> str:
    params = json.loads(tuned)
    short = {"peers.*.optimizer.lr": "lr", "peers.*.optimizer.schedule": "", "method.temperature": "T",
             "method.weight": "w", "train.label_smoothing": "ls"}
    parts = [f"{short.get(k, k)}={v:.3g}" if isinstance(v, float) else (v if short.get(k) == "" else f"{short.get(k, k)}={v}")
             for k, v in params.items()]
    return " ".join(parts)


def markdown_table(rows: list[dict], cfg: ExperimentConfig, tune_trials: int, differences: list[dict] | None = None,
                   baseline: str | None = None, reaching: tuple[str, float] | None = None) -> str:
    """`reaching`: (where the target came from, the target) for the steps-to-target table."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    peers = " + ".join(p.model for p in cfg.peers)
    test = (f"a generated test set of {cfg.data.test_examples} examples" if cfg.data.test_examples
            else "the data set's test split")
    lines = [f"Peers {peers}; {cfg.train.steps} steps; seeds {', '.join(map(str, seeds))}; {test}; test accuracy (%) "
             "of the group's members (peers, or branches of one network)."
             + (f" Each method tuned alike: {tune_trials} trials on a validation split (the first at its recipe's "
                f"setting), each trial the mean of {TUNE_SEEDS} seeds." if tune_trials else "")]
    if differences:
        lines += ["", f"**paired difference to {baseline} at the last step** (percentage points, same seeds: mean "
                  "[95% t-interval over seeds], wins k of n; an interval that includes 0 is no resolvable effect)", "",
                  "| method | mean member | ensemble | best member | seeds for ±0.5 (mean member) |", "|---|---|---|---|---|"]
        for entry in differences:
            mine = [r["diff_mean"] for r in rows if r["method"] == entry["method"] and "diff_mean" in r]
            needed = resolving_seeds(mine)
            cells = " | ".join(difference_text(entry, f) for f in PAIRED)
            lines.append(f"| {entry['method']} | {cells} | {needed if needed else '—'} |")
    if tune_trials:
        lines += ["", "**what tuning bought** (validation, mean member, mean of the trial's seeds)", "",
                  "| method | recipe's setting | chosen | chosen values |", "|---|---|---|---|"]
        for method in methods:
            first = next(r for r in rows if r["method"] == method)
            default = f"{100 * first['default_validation']:.2f}" if first["default_validation"] is not None else "—"
            lines.append(f"| {method} | {default} | {100 * first['tuned_validation']:.2f} | {_tuned_text(first['tuned'])} |")
    for prefix, title in (("last", "at the last step"), ("bestevaluation", "at the best evaluation (by mean member; labelled: not a last-step figure)")):
        lines += ["", f"**{title}**: mean ± std over seeds; churn (%) is the share of test examples two members disagree on", "",
                  "| method | members | first | best | mean | ensemble | churn |", "|---|---|---|---|---|---|---|"]
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            cells = " | ".join(mean_std([r[f"{prefix}_{k}"] for r in mine]) for k in FIGURES)
            lines.append(f"| {method} | {mine[0]['members']} | {cells} |")
    score = score_of(rows[0]) if rows else ACCURACY
    if score is not ACCURACY:  # the task's own score (bits per token), in its own direction
        name, label = score.name, score.label
        better = "fewer" if score.lower_is_better else "more"
        sign = "negative" if score.lower_is_better else "positive"
        if baseline is not None:
            lines += ["", f"**paired difference in {label} to {baseline} at the last step** (test; {sign}: {better} "
                      f"{label}, better; same seeds: mean [95% t-interval over seeds], {better} on k of n seeds; an "
                      "interval that includes 0 is no resolvable effect)", "",
                      "| method | mean member | ensemble | best member |", "|---|---|---|---|"]
            for entry in paired_differences(rows, baseline, f"{name}_{{}}", scale=score.scale, prefix=f"{name}_diff",
                                            lower_is_better=score.lower_is_better):
                lines.append(f"| {entry['method']} | "
                             f"{' | '.join(difference_text(entry, f, digits=score.digits) for f in PAIRED)} |")
        lines += ["", f"**{label} at the last step** (test; {'lower' if score.lower_is_better else 'higher'} is "
                  "better) and bytes a peer sent per round", "",
                  "| method | first | best | mean | ensemble | bytes / round |", "|---|---|---|---|---|---|"]
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            cells = " | ".join(mean_std([r[f"{name}_{k}"] for r in mine], scale=score.scale, digits=score.digits)
                               for k in ("first", "best", "mean", "ensemble"))
            sent = [r["bytes_per_round"] for r in mine if r.get("bytes_per_round")]
            lines.append(f"| {method} | {cells} | {f'{statistics.mean(sent):,.0f}' if sent else '—'} |")
    if reaching is not None and all(r.get("curve_step") for r in rows):
        source, target = reaching
        lines += speed.markdown_section(rows, target, source, baseline or rows[0]["method"])
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[dict], differences: list[dict], baseline: str, storage: RunStorage,
                    target: float | None = None) -> None:
    """Top left: each method's paired differences to the baseline (per seed, and the mean with
    its 95% interval) around 0; top right: the accuracies themselves; below, each method's
    curve against steps, examples and seconds (mean over seeds, band from lowest to highest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    others = [e["method"] for e in differences]
    curves = all(r.get("curve_step") for r in rows)
    fig = plt.figure(figsize=(max(12.0 if curves else 8.0, 1.2 * len(methods) + 4), 8.5 if curves else 4.0),
                     layout="constrained")  # a 2-column row above a 3-column one
    left, right = fig.add_subplot(2 if curves else 1, 2, 1), fig.add_subplot(2 if curves else 1, 2, 2)
    if curves:
        speed.plot_curves([fig.add_subplot(2, 3, 4 + i) for i in range(3)], rows, target)
    for i, entry in enumerate(differences):
        for k, figure in enumerate(("mean", "ensemble")):
            x = i + (k - 0.5) * 0.3
            values = [r[f"diff_{figure}"] for r in rows if r["method"] == entry["method"] and f"diff_{figure}" in r]
            left.scatter([x] * len(values), values, s=10, color=f"C{k}", alpha=0.5,
                         label=("mean member" if k == 0 else "ensemble") if i == 0 else None)
            mean, low, high = (entry[f"diff_{figure}{s}"] for s in ("", "_low", "_high"))
            if low != float("-inf"):
                left.errorbar([x], [mean], yerr=[[mean - low], [high - mean]], fmt="o", color=f"C{k}", capsize=4)
    left.axhline(0, color="black", linewidth=0.8)
    left.set_xticks(range(len(others)), others, rotation=30, ha="right")
    left.set_ylabel(f"difference to {baseline} (points)")
    left.set_title("paired by seed, 95% t-interval")
    left.grid(alpha=0.3, axis="y")
    if differences:
        left.legend()
    for i, method in enumerate(methods):
        values = [100 * r["last_mean"] for r in rows if r["method"] == method]
        right.scatter([i] * len(values), values, s=10, color="C0", alpha=0.5)
        right.errorbar([i], [statistics.mean(values)], yerr=[statistics.stdev(values) if len(values) > 1 else 0.0],
                       fmt="_", color="C0", capsize=4, markersize=14)
    right.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    right.set_ylabel("mean member test accuracy (%)")
    right.set_title("last step, mean ± std over seeds")
    right.grid(alpha=0.3, axis="y")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(PLOT_FILE, buffer.getvalue())
