"""The teacher→student table of docs/comparing.md on MNIST-1D, from the Python API: a wide CNN teacher
trained by codistill itself, then two students (the MNIST-1D MLP and a narrow CNN) trained
alone, with KD, FitNets, AT, FSP, KD + AT, and as born-again networks (3 generations), over
several seeds with one recipe and one step budget; then DML against DML + attention transfer
between two peers of different widths. Prints Markdown tables of the last-step test accuracy,
mean ± std over seeds.

    python examples/teacher_student.py --seeds 0 1 2 [--steps 6000] [--storage runs/teacher_student]
    python examples/teacher_student.py --seeds 0 1 2 --students mnist1d_cnn_narrow --only \
        "logit regression" overhaul CRD FT --no-born-again --no-online     # the later family, paired

With `--only`, the student trained alone runs too, and each row is also reported as the paired
difference to it on the same seeds (mean [95% t-interval], wins k of n), as `compare` does.

No setting is tuned here: every method runs with its paper's defaults (KD T = 4, α = 0.9; AT
β = 1000 on the conv2 and conv3 maps; FitNets β = 1 with the paper's hint stage over the first
1000 steps; born-again KD at T = 1, α = 0.5). A term that cannot apply to a pair (FSP across
widths, AT or FSP on an MLP's vectors) is reported as n/a with the reason.
"""

import argparse
import os
import statistics

from codistill import ConfigError, load_config, train
from codistill.experiments.born_again import run_generations

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

STUDENT_METHODS = {
    "alone": "method={name: independent}",
    "KD": "method={name: kd, temperature: 4.0, alpha: 0.9}",
    "FitNets": "method={name: fitnets, student_tap: TAP, teacher_tap: conv2, weight: 1.0, hint_steps: 1000}",
    "AT": "method={name: at, taps: [conv2, conv3], weight: 1000}",
    "FSP": "method={name: fsp, pairs: [[conv1, conv2], [conv2, conv3]]}",
    "KD + AT": "method={name: kd, temperature: 4.0, alpha: 0.9, also: [{name: at, taps: [conv2, conv3], weight: 1000}]}",
    "logit regression": "method={name: logit_regression}",
    "overhaul": "method={name: overhaul, taps: [conv2.pre, conv3.pre]}",
    "CRD": "method={name: crd}",
    "FT": "method={name: ft, student_tap: conv3, teacher_tap: conv3}",
}
STUDENTS = {"mnist1d_mlp": "hidden1", "mnist1d_cnn_narrow": "conv2"}


def cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--storage", default=os.path.join(REPO, "runs", "teacher_student"))
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--only", nargs="+", choices=list(STUDENT_METHODS), help="these rows (and `alone`)")
    parser.add_argument("--no-born-again", action="store_true")
    parser.add_argument("--no-online", action="store_true")
    args = parser.parse_args()
    methods = {k: v for k, v in STUDENT_METHODS.items() if not args.only or k in args.only or k == "alone"}
    students = {s: STUDENTS[s] for s in args.students}
    common = [f"train.steps={args.steps}", f"ray.storage_path={args.storage}", "train.checkpoint_every=0"]

    # The teacher keeps its own recipe's length: --steps is the students' budget.
    teacher = train(load_config(os.path.join(CONFIGS, "teacher_mnist1d_wide.yaml"), common[1:]), "local")
    print(f"teacher {teacher.config.peers[0].model}: {100 * teacher.final['peer_accuracy'][0]:.2f}%", flush=True)
    teach = f"teacher={{run: {teacher.storage.uri}}}"

    results: dict[tuple[str, str], list[float]] = {}
    reasons: dict[tuple[str, str], str] = {}
    for student, tap in students.items():
        for seed in args.seeds:
            for label, method in methods.items():
                overrides = [*common, f"name={student}-{label.replace(' ', '')}-{seed}", f"seed={seed}",
                             f"peers=[{{model: {student}, optimizer: {{name: adam, lr: 0.01, schedule: cosine}}}}]",
                             method.replace("TAP", tap)]
                overrides.append(teach if label != "alone" else "teacher=null")
                try:
                    run = train(load_config(os.path.join(CONFIGS, "kd_mnist1d.yaml"), overrides), "local")
                except ConfigError as err:  # the term does not apply to this pair: say why
                    reasons[(student, label)] = str(err)
                    continue
                results.setdefault((student, label), []).append(run.final["peer_accuracy"][0])
                print(f"{student} {label} seed {seed}: {100 * run.final['peer_accuracy'][0]:.2f}%", flush=True)
            if args.no_born_again:
                continue
            ban = run_generations(load_config(os.path.join(CONFIGS, "born_again_mnist1d.yaml"), [
                *common, f"name={student}-ban-{seed}", f"seed={seed}", f"peers.0.model={student}"]), "local")
            rows = ban.table.to_pylist()
            results.setdefault((student, "born-again, generation 2"), []).append(rows[-1]["accuracy"])
            results.setdefault((student, "born-again, ensemble of 3 generations"), []).append(rows[-1]["ensemble_accuracy"])
            print(f"{student} born-again seed {seed}: {[round(100 * r['accuracy'], 2) for r in rows]}", flush=True)

    labels = [*methods] + ([] if args.no_born_again else ["born-again, generation 2",
                                                           "born-again, ensemble of 3 generations"])
    print(f"\nteacher {teacher.config.peers[0].model} (seed 0): {100 * teacher.final['peer_accuracy'][0]:.2f}%\n")
    print("| student's training | " + " | ".join(students) + " |")
    print("|---|" + "---|" * len(students))
    for label in labels:
        print(f"| {label} | " + " | ".join(cell(results.get((s, label), [])) for s in students) + " |")
    if args.only:  # paired by seed with the student alone, as `codistill compare` reports it
        from codistill.experiments.paired import t_interval

        print("\n| student's training | " + " | ".join(f"{s}: difference to alone (points)" for s in students) + " |")
        print("|---|" + "---|" * len(students))
        for label in labels[1:]:
            cells = []
            for s in students:
                alone, mine = results.get((s, "alone"), []), results.get((s, label), [])
                if len(mine) != len(alone) or not mine:
                    cells.append("n/a")
                    continue
                diffs = [100 * (m - a) for m, a in zip(mine, alone)]
                mean, low, high = t_interval(diffs)
                verdict = "" if low > 0 or high < 0 else ": no resolvable effect"
                cells.append(f"{mean:+.2f} [{low:+.2f}, {high:+.2f}] {sum(d > 0 for d in diffs)}/{len(diffs)}{verdict}")
            print(f"| {label} | " + " | ".join(cells) + " |")
    for (student, label), reason in reasons.items():
        print(f"\nn/a — {label} for {student}: {reason}")
    if args.no_online:
        return

    # DML against DML + attention transfer between peers (a CNN and a narrow CNN).
    peers = "peers=[{model: mnist1d_cnn, optimizer: {name: adam, lr: 0.01, schedule: cosine}}, " \
            "{model: mnist1d_cnn_narrow, optimizer: {name: adam, lr: 0.01, schedule: cosine}}]"
    online: dict[str, dict[str, list[float]]] = {}
    for label, extra in (("DML", []), ("DML + AT between peers", [
            "method.also=[{name: at, source: peers, taps: [conv2, conv3], weight: 1000}]"])):
        for seed in args.seeds:
            run = train(load_config(os.path.join(CONFIGS, "dml_mnist1d.yaml"), [
                *common, f"name=online-{label.replace(' ', '')}-{seed}", f"seed={seed}", peers, *extra]), "local")
            figures = online.setdefault(label, {})
            for k, acc in enumerate(run.final["peer_accuracy"]):
                figures.setdefault(f"peer {k}", []).append(acc)
            figures.setdefault("ensemble", []).append(run.final["ensemble_accuracy"])
            figures.setdefault("churn", []).append(run.final["churn"])
            print(f"{label} seed {seed}: {run.final['peer_accuracy']}", flush=True)
    print("\n| method | peer 0 (mnist1d_cnn) | peer 1 (mnist1d_cnn_narrow) | ensemble | churn |")
    print("|---|---|---|---|---|")
    for label, figures in online.items():
        print(f"| {label} | " + " | ".join(cell(figures[k]) for k in ("peer 0", "peer 1", "ensemble", "churn")) + " |")


if __name__ == "__main__":
    main()
