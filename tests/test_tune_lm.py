"""A sweep (`codistill tune`, and `codistill compare --tune`) is judged by the task's score: a
language model's trials by bits per token, the fewest best; a classifier's by accuracy, as
before (its stored sweeps and tunings stay the same sweeps)."""

import pytest
import yaml

from codistill.config import ConfigError, load_config, to_dict
from codistill.experiments.tune import BEST_FILE, SweepResult
from codistill.metrics import ACCURACY, BITS
from codistill.records import final_metrics, read_records
from codistill.storage import RunStorage
from tests.conftest import REPO

LM = f"{REPO}/configs/codistill_lm_stdlib.yaml"
TINY_LM = ["peers.*.model_args={width: 16, depth: 1, heads: 2, context: 16}", "data.context=16", "data.batch_size=4",
           "data.test_windows=8", "method=dml", "peers.*.optimizer.schedule=constant", "peers.*.optimizer.warmup_steps=0"]
SPACE = "tune.space={method.temperature: 'uniform(1, 2)'}"


def test_a_sweeps_objective_follows_the_task_and_bits_need_a_task_scored_in_bits(tmp_path):
    classifier = load_config(f"{REPO}/configs/tune_dml_mnist1d.yaml", ["tune.objective=null"])
    assert classifier.tune.objective == "ensemble_accuracy" and classifier.tune.score is ACCURACY
    lm = load_config(LM, [SPACE])
    assert lm.tune.objective == "ensemble_bits" and lm.tune.score is BITS and lm.tune.score.mode == "min"
    assert load_config(LM, [SPACE, "tune.objective=member_mean_bits"]).tune.score is BITS
    asked = load_config(LM, [SPACE, "tune.objective=mean_accuracy"])  # asked for: a language model reports it too
    assert asked.tune.objective == "mean_accuracy" and asked.tune.score.mode == "max"
    with pytest.raises(ConfigError) as info:
        load_config(f"{REPO}/configs/tune_dml_mnist1d.yaml", ["tune.objective=mean_bits"])
    assert info.value.path == "tune.objective" and "ensemble_accuracy" in info.value.message
    assert "mnist1d" in info.value.message and "\n" not in str(info.value)


def test_compare_tunes_a_language_model_by_its_members_bits_the_fewest_best(tmp_path, monkeypatch):
    import pyarrow as pa

    from codistill.experiments import compare, tune
    from codistill.experiments.cells import parse_method

    spec = parse_method("dml")
    classifier = to_dict(load_config(f"{REPO}/configs/compare_mnist1d.yaml", [f"ray.storage_path={tmp_path}"]))
    # A classifier's tuning is the one stored tunings were made by.
    assert compare.tuning_data(spec, classifier, "c", 2)["tune"]["objective"] == "member_mean_accuracy"
    lm = to_dict(load_config(LM, [f"ray.storage_path={tmp_path}", *TINY_LM]))
    asked = compare.tuning_data(spec, lm, "c", 2)
    assert asked["tune"]["objective"] == "member_mean_bits"
    # Two finished trials: the recipe's setting at 9.1 bits, another at 8.4 — fewer bits win.
    start = tune.config_point(asked, asked["tune"]["space"])
    other = {**start, "method.temperature": start.get("method.temperature", 1.0) + 1}
    table = pa.Table.from_pylist([{"trial_id": tid, **{f"param:{k}": v for k, v in params.items()}, "objective": bits,
                                   "status": "TERMINATED", "error": None}
                                  for tid, params, bits in (("a", start, 9.1), ("b", other, 8.4))])
    monkeypatch.setattr(tune, "run_sweep", lambda cfg, on_change: SweepResult(table, cfg, 8.4, None, BITS))
    record = compare.tune_method(spec, asked, RunStorage(str(tmp_path), "c"))
    assert record["params"] == other and record["validation_objective"] == 8.4 and record["default_objective"] == 9.1
    assert compare.tuned_text(record).endswith("(validation 8.400 bits per token; its recipe's setting 9.100 bits per token)")


def test_a_language_model_sweep_keeps_the_trial_with_fewer_bits_and_asha_stops_the_one_with_more(ray_local, tmp_path):
    """Local trials of two tiny GPT peers, a learning rate that learns and one that cannot: the
    objective is bits per token (ensemble_bits, the task's default), ASHA minimises it — the
    trial with more bits is the one stopped — and the best config is the trial with fewer."""
    from codistill.experiments.tune import run_sweep

    cfg = load_config(LM, [f"ray.storage_path={tmp_path}", "name=lm_sweep", *TINY_LM, "train.steps=20",
                           "train.eval_every=10", "train.checkpoint_every=10",
                           "tune={space: {peers.*.optimizer.lr: 'grid([0.01, 1.0e-7])'}, num_samples: 1, "
                           "scheduler: asha, max_concurrent: 1, backend: local}"])
    assert cfg.tune.objective == "ensemble_bits"
    result = run_sweep(cfg)
    rows = {r["param:peers.*.optimizer.lr"]: r for r in result.table.to_pylist()}
    learns, cannot = rows[0.01], rows[1e-7]
    assert learns["status"] == "TERMINATED" and cannot["status"] == "STOPPED" and cannot["last_step"] < 20
    # Bits, not a fraction: the run's own final ensemble bits per token.
    final = final_metrics(read_records(RunStorage(f"{tmp_path}/lm_sweep/runs", learns["trial_id"])))
    assert learns["objective"] == pytest.approx(final["ensemble_bits"]) and learns["objective"] > 1
    assert learns["objective"] < cannot["objective"] and learns["best_objective"] == learns["objective"]
    assert result.best_objective == learns["objective"] and result.score is BITS
    best = yaml.safe_load((tmp_path / "lm_sweep" / BEST_FILE).read_text())
    assert best["peers"][0]["optimizer"]["lr"] == 0.01
    assert "%" not in result.summary and f"{learns['objective']:.3f}" in result.summary
