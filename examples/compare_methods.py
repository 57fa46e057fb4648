"""Train a config under several methods and seeds and print a Markdown table of
per-peer accuracy, ensemble accuracy and churn (the README's tables come from here).

    python examples/compare_methods.py configs/dml_mnist1d.yaml --methods independent dml --seeds 0 1 2

Runs on the local runner (the Ray runner reproduces it to float tolerance; see the tests).
"""

import argparse
import statistics
import tempfile

from codistill import load_config, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--methods", nargs="+", default=["independent", "dml"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    args = parser.parse_args()

    rows, means = [], {}
    with tempfile.TemporaryDirectory() as storage:
        for method in args.methods:
            for seed in args.seeds:
                # Independent training takes no distillation settings: replace the whole section.
                method_override = "method={name: independent}" if method == "independent" else f"method.name={method}"
                cfg = load_config(args.config, [*args.set, method_override, f"seed={seed}",
                                                f"name={method}-{seed}", f"ray.storage_path={storage}"])
                final = train(cfg, "local").final
                accs = final["peer_accuracy"]
                if cfg.num_peers == 1 and final["head_accuracy"]:
                    # One network with several heads (ONE's branches): the branches are the members.
                    accs = [heads[0] for heads in final["head_accuracy"].values()]
                rows.append((method, seed, accs, final["ensemble_accuracy"], final["churn"]))
                means.setdefault(method, []).append(statistics.mean(accs))
                print(f"{method} seed {seed}: peers {[round(100 * a, 1) for a in accs]}", flush=True)
    peers = max(len(r[2]) for r in rows)
    print("\n| method | seed | " + " | ".join(f"peer/branch {k}" for k in range(peers)) + " | mean | ensemble | churn |")
    print("|---|---|" + "---|" * peers + "---|---|---|")
    for method, seed, accs, ens, ch in rows:
        cells = " | ".join(f"{100 * a:.1f}" if k < len(accs) else "" for k, a in enumerate(accs + [0] * (peers - len(accs))))
        print(f"| {method} | {seed} | {cells} | {100 * statistics.mean(accs):.1f} | {100 * ens:.1f} | {100 * ch:.1f} |")
    print("\nmean peer accuracy over seeds: " + ", ".join(
        f"{m} {100 * statistics.mean(v):.2f}%" for m, v in means.items()))


if __name__ == "__main__":
    main()
