"""The report of a comparison: `compare.md` (the paired differences, what tuning bought, the
figures at the last step and at the best evaluation, bits per token) and `compare.png`."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import statistics

from codistill.config import ExperimentConfig, to_dict
from codistill.data import DATASETS
from codistill.experiments import retraining, speed
from codistill.experiments.cells import DATA_PARALLEL, FIGURES, TUNE_SEEDS, cell_recipe, parse_method, search_space
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


SHORT_KEYS = {"peers.*.optimizer.lr": "lr", "peers.*.optimizer.schedule": "schedule", "method.temperature": "T",
              "method.weight": "w", "train.label_smoothing": "ls"}


def _searched(space: dict[str, str]) -> str:
    """A search space in a few words: `lr 0.0025–0.04 (log), schedule {constant, cosine}, ls 0–0.2`."""
    parts = []
    for key, text in space.items():
        found = re.fullmatch(r"(log)?uniform\(([^,]+),\s*([^)]+)\)", text)
        choice = re.fullmatch(r"choice\(\[(.*)\]\)", text)
        what = (f"{float(found[2]):.3g}–{float(found[3]):.3g}" + (" (log)" if found[1] else "") if found
                else "{" + choice[1].replace("'", "") + "}" if choice else text)
        parts.append(f"{SHORT_KEYS.get(key, key)} {what}")
    return ", ".join(parts)


def protocol_text(rows: list[dict], cfg: ExperimentConfig, tune_trials: int,
                  reaching: tuple[str, float] | None) -> str:
    """Which comparison this was, in one paragraph: at equal workers or not (is one data-parallel
    model on the group's workers an arm), judged by steps to a target or by final quality alone,
    and which arms were tuned and over what — so an Anil et al. (2018) style result (equal workers,
    steps to a target) is not read as a Sinha et al. (2021) style one (final quality, every arm
    tuned with the regularisation baselines), or the other way round."""
    specs = [parse_method(label) for label in dict.fromkeys(r["method"] for r in rows)]
    k, b = cfg.num_peers, cfg.data.batch_size
    arm = next((s.label for s in specs if s.name == DATA_PARALLEL), None)
    workers = (f"equal workers — {arm} trains one model on the workers of the {k} peers (batch {k * b}) against "
               f"{k} peers of batch {b} each" if arm else
               f"not at equal workers — no {DATA_PARALLEL} arm: every arm trains its {k} peers of batch {b}, compared "
               "with each other, not with one model on the same workers")
    if reaching is not None:
        source, target = reaching
        score = DATASETS.get(cfg.data.name, "data.name").task.score  # what the data is scored in
        given = "given by --target" if source == "--target" else source
        outcome = (f"steps to a target, {score.shown(target)} ({given}), beside "
                   f"the final quality at step {cfg.train.steps}")
    else:
        outcome = f"final quality at step {cfg.train.steps} (no target: no --target and no {DATA_PARALLEL} arm)"
    if tune_trials:
        base = to_dict(dataclasses.replace(cfg, tune=None))
        tuning = (f"every arm tuned alike, {tune_trials} trial{'s' * (tune_trials > 1)} each (the first at its "
                  f"recipe's setting, the rest random; {TUNE_SEEDS} seeds per trial on a validation split), searching "
                  + "; ".join(f"{s.label}: {_searched(search_space(s, cell_recipe(base, s)))}" for s in specs))
    else:
        tuning = ("untuned — every arm at its recipe's setting" + (f" ({arm}'s learning rate by the √K or linear rule, "
                                                                   "not a search)" if arm else ""))
    style = ("Anil et al. 2018's protocol" if arm and reaching is not None
             else "a final-quality comparison, not Anil et al.'s equal-workers protocol")
    return f"**Protocol** ({style}): {workers}; outcome: {outcome}; {tuning}."


def markdown_table(rows: list[dict], cfg: ExperimentConfig, tune_trials: int, differences: list[dict] | None = None,
                   baseline: str | None = None, reaching: tuple[str, float] | None = None,
                   retrained: list[dict] | None = None) -> str:
    """`reaching`: (where the target came from, the target) for the steps-to-target table;
    `retrained`: churn between retrainings (`retraining.retraining_churn`)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    peers = " + ".join(p.model for p in cfg.peers)
    test = (f"a generated test set of {cfg.data.test_examples} examples" if cfg.data.test_examples
            else "the data set's test split")
    lines = [protocol_text(rows, cfg, tune_trials, reaching), "",
             f"Peers {peers}; {cfg.train.steps} steps; seeds {', '.join(map(str, seeds))}; {test}; test accuracy (%) "
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
        tuned_by = score_of(rows[0]) if rows else ACCURACY  # a language model is tuned by bits per token
        lines += ["", f"**what tuning bought** (validation {tuned_by.label}, mean member, mean of the trial's seeds)", "",
                  "| method | recipe's setting | chosen | chosen values |", "|---|---|---|---|"]
        for method in methods:
            first = next(r for r in rows if r["method"] == method)
            default = (tuned_by.shown(first["default_validation"], unit=False) if first["default_validation"] is not None
                       else "—")
            lines.append(f"| {method} | {default} | {tuned_by.shown(first['tuned_validation'], unit=False)} | "
                         f"{_tuned_text(first['tuned'])} |")
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
    if retrained:
        lines += retraining.markdown_section(retrained, baseline or rows[0]["method"])
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
