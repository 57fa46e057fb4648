"""Churn between retrainings (Anil et al. 2018): two seeds of one arm against each other, from the
cells' final checkpoints, with a jackknife interval over seeds and paired to the baseline."""

import math

import pytest
import torch

from codistill.data import load_data
from codistill.experiments.compare import compare
from codistill.experiments.retraining import final_predictions, jackknife, pair_churn, pairwise, retraining_churn
from codistill.records import read_records
from codistill.storage import RunStorage
from tests.conftest import small_config


def flips(base: torch.Tensor, share: float) -> torch.Tensor:
    """`base` with its first `share` of the examples moved to another class."""
    out = base.clone()
    n = round(share * len(base))
    out[:n] = (out[:n] + 1) % 10
    return out


def test_pair_churn_is_the_mean_over_member_pairs_of_the_examples_they_disagree_on():
    base = torch.arange(100) % 10
    a = torch.stack([base, flips(base, 0.2)])  # two members
    b = torch.stack([base])  # the one model
    # (member 0, model): 0; (member 1, model): 0.2.
    assert pair_churn(a, b) == pytest.approx(0.1)
    assert pair_churn(b, b) == 0.0


def test_the_jackknife_over_seeds_is_computed_by_hand_and_needs_three_seeds():
    pairs = {(0, 1): 0.10, (0, 2): 0.20, (1, 2): 0.30}
    mean, low, high = jackknife(pairs)
    # Leave seed 0 out: the pair (1, 2) is left, 0.30; seed 1: 0.20; seed 2: 0.10. Their mean 0.20;
    # variance (n-1)/n Σ (θ_-k − 0.2)² = 2/3 · 0.02; t at 2 degrees of freedom 4.303.
    half = 4.303 * math.sqrt(2 / 3 * 0.02)
    assert mean == pytest.approx(0.2) and (low, high) == pytest.approx((0.2 - half, 0.2 + half))
    assert jackknife({(0, 1): 0.1})[1:] == (-math.inf, math.inf)


def test_the_difference_to_the_baseline_is_paired_over_the_same_seed_pairs():
    base = torch.arange(1000) % 10
    moved = flips(base, 1.0)
    # The baseline's seeds 1 and 2 each differ from seed 0 on another 10% (from each other on 20%);
    # the arm's seed 2 differs from seed 0 on its first 30% instead.
    baseline = {0: base[None], 1: flips(base, 0.1)[None], 2: torch.cat([base[:900], moved[900:]])[None]}
    arm = {0: base[None], 1: flips(base, 0.1)[None], 2: torch.cat([moved[:300], base[300:]])[None]}
    summary = {e["method"]: e for e in retraining_churn({"dp": baseline, "codistill": arm}, "dp")}
    assert "diff" not in summary["dp"] and summary["dp"]["seeds"] == 3
    # Pairs (0,1), (0,2), (1,2): the baseline 0.1, 0.1, 0.2; the arm 0.1, 0.3, 0.2 (seed 1 moved the
    # first 10%, seed 2 the first 30%): differences 0, 0.2, 0.
    assert pairwise(arm) == pytest.approx({(0, 1): 0.1, (0, 2): 0.3, (1, 2): 0.2})
    assert summary["codistill"]["churn"] == pytest.approx(0.2) and summary["dp"]["churn"] == pytest.approx(0.4 / 3)
    assert summary["codistill"]["diff"] == pytest.approx(0.2 / 3)


@pytest.mark.slow  # ~20 s: six short runs
def test_compare_reports_churn_between_retrainings_from_the_cells_final_checkpoints(tmp_path):
    cfg = small_config(tmp_path, "name=churn", "train.steps=60", "train.eval_every=30", "train.checkpoint_every=30",
                       base="configs/compare_mnist1d.yaml")
    result = compare(cfg, ["data_parallel", "independent"], [0, 1, 2], log=lambda *_: None)
    assert "churn between retrainings" in result.markdown
    line = next(x for x in result.markdown.splitlines() if x.startswith("| independent | 2 | 3 |"))
    assert "(baseline)" not in line and "[n/a" not in line
    # The checkpoint rebuilt gives the run's own predictions: the churn between its two peers
    # that the run recorded at its last evaluation is the one of the rebuilt peers.
    row = next(r for r in result.table.to_pylist() if r["method"] == "independent" and r["seed"] == 1)
    cell = RunStorage(str(tmp_path), row["run"])
    from codistill.engine.run import CONFIG_FILE
    from codistill.config import load_config, load_yaml

    cell_cfg = load_config(load_yaml(cell.read_bytes(CONFIG_FILE).decode()))
    predicted = final_predictions(cell_cfg, cell, load_data(cell_cfg.data))
    assert predicted.shape == (2, cfg.data.test_examples or 1000)
    recorded = [r for r in read_records(cell).to_pylist() if r["split"] == "test" and r["step"] == 60][0]["churn"]
    assert pair_churn(predicted[:1], predicted[1:]) == pytest.approx(recorded, abs=1e-6)


def test_the_critical_batch_map_reads_ratios_and_the_data_parallel_cells_noise_scale(tmp_path, monkeypatch):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import REPO

    monkeypatch.syspath_prepend(f"{REPO}/examples")
    from critical_batch_map import comparison_row

    folder = tmp_path / "critical_b400"
    folder.mkdir()
    rows = [{"method": "data_parallel", "seed": s, "run": f"critical_b400.data_parallel.seed{s}", "target_step": t,
             "examples_per_step": 800, "curve_step": [500, 1000]} for s, t in ((0, 400), (1, 600), (2, None), (3, 500))]
    rows += [{"method": "codistill:burn_in=100", "seed": s, "run": f"c{s}", "target_step": t, "examples_per_step": 400,
              "curve_step": [500, 1000]} for s, t in ((0, 200), (1, 1200), (2, 300), (3, None))]
    pq.write_table(pa.Table.from_pylist(rows), folder / "compare.parquet")
    for seed, b in ((0, 100.0), (1, 300.0)):
        measured = tmp_path / f"critical_b400.data_parallel.seed{seed}.noise_scale"
        measured.mkdir()
        (measured / "noise_scale.json").write_text(json.dumps({"rows": [{"step": 0, "b_simple": b / 4},
                                                                        {"step": 1000, "b_simple": 4 * b}]}))
    row = comparison_row(str(folder), "codistill", "data_parallel")
    # Seed 2's data-parallel model never reached the target: no ratio for it. Seed 3's codistilled
    # peers did not either, in 1000 steps: at least 1000 / 500, drawn apart, not in the mean.
    assert row["ratios"] == [0.5, 2.0] and row["ratio"] == pytest.approx(1.0) and row["censored"] == [2.0]
    # B_simple where the data-parallel model reached the target (step 500, the mean of 400, 600,
    # 500), log-linear between the measured steps: b there, mean over the seeds measured.
    assert row["batch"] == 400 and row["b_simple_step"] == 500 and row["b_simple"] == pytest.approx(200.0)
