"""`compare` names its protocol (issue 40): at equal workers or not, steps to a target or final
quality, which arms were tuned and over what — the first paragraph of compare.md, which the
command also prints."""

import pytest

from codistill.experiments.compare_report import markdown_table
from codistill.experiments.paired import paired_differences
from tests.conftest import small_config

FIGURES = ("first", "best", "mean", "ensemble", "churn")


def _text(tmp_path, methods, tune_trials=0, reaching=None):
    rows = [{"method": m, "seed": 0, "members": 2, "tuned": "{}", "tuned_validation": 0.9, "default_validation": 0.9,
             **{f"{p}_{k}": 0.9 for p in ("last", "bestevaluation") for k in FIGURES}} for m in methods]
    cfg = small_config(tmp_path, "data.batch_size=50")
    return markdown_table(rows, cfg, tune_trials, paired_differences(rows, methods[0]), methods[0], reaching)


def _protocol(text: str) -> str:
    first = text.splitlines()[0]
    assert first.startswith("**Protocol**"), first
    return first


def test_an_equal_workers_comparison_to_a_target_is_named_anils(tmp_path):
    line = _protocol(_text(tmp_path, ["data_parallel", "codistill"], reaching=("data_parallel's own final", 0.91)))
    assert "(Anil et al. 2018's protocol): equal workers — data_parallel trains one model on the workers of the 2 " \
           "peers (batch 100) against 2 peers of batch 50 each" in line
    assert "outcome: steps to a target, 91.00% (data_parallel's own final), beside the final quality at step 120" in line
    assert "untuned — every arm at its recipe's setting (data_parallel's learning rate by the √K" in line


def test_without_a_data_parallel_arm_or_target_it_is_final_quality_between_methods(tmp_path):
    line = _protocol(_text(tmp_path, ["independent", "dml"]))
    assert "(a final-quality comparison, not Anil et al.'s equal-workers protocol): not at equal workers" in line
    assert "outcome: final quality at step 120 (no target" in line


def test_a_given_target_is_said_to_be_given(tmp_path):
    assert "steps to a target, 93.00% (given by --target)" in _protocol(
        _text(tmp_path, ["independent", "dml"], reaching=("--target", 0.93)))


@pytest.mark.parametrize("trials", [1, 4])
def test_the_tuning_names_its_trials_and_what_each_arm_searched(tmp_path, trials):
    line = _protocol(_text(tmp_path, ["data_parallel", "independent:train.label_smoothing=0.1", "dml"], trials,
                           reaching=("data_parallel's own final", 0.9)))
    assert f"every arm tuned alike, {trials} trial{'s' * (trials > 1)} each (the first at its recipe's setting" in line
    # data_parallel searches around its √2-scaled learning rate; a fixed label smoothing is not searched;
    # DML's temperature and weight are.
    assert "data_parallel: lr 0.00354–0.0566 (log), schedule {constant, cosine}, ls 0–0.2;" in line
    assert "independent:train.label_smoothing=0.1: lr 0.0025–0.04 (log), schedule {constant, cosine};" in line
    assert "dml: lr 0.0025–0.04 (log), schedule {constant, cosine}, ls 0–0.2, T 1–8 (log), w 0.1–2." in line


@pytest.mark.slow
def test_compare_writes_and_prints_its_protocol_first(tmp_path):
    from codistill.experiments.compare import compare
    from tests.test_compare import tiny

    result = compare(tiny(tmp_path, "name=dp"), ["data_parallel", "independent"], [0], log=lambda *_: None)
    written = (tmp_path / "dp" / "compare.md").read_text()
    assert written == result.markdown  # what `codistill compare` prints
    assert _protocol(written).startswith("**Protocol** (Anil et al. 2018's protocol): equal workers")
