"""Born-again networks: generations chained through their runs, the ensemble of generations."""

import pytest
import torch

from codistill.experiments.born_again import GENERATIONS_FILE, run_generations
from codistill.config import ConfigError
from codistill.engine.checkpoint import LocalCheckpoints
from codistill.metrics import ensemble_accuracy
from tests.conftest import small_config


@pytest.mark.slow  # > 1.5 s: the full tier
def test_each_generation_learns_from_the_one_before_and_the_ensemble_is_of_all(tmp_path):
    cfg = small_config(tmp_path, "train.steps=80", base="configs/born_again_mnist1d.yaml")
    result = run_generations(cfg, "local")
    names = [run.config.name for run in result.runs]
    assert names == ["born_again_mnist1d-gen0", "born_again_mnist1d-gen1", "born_again_mnist1d-gen2"]
    assert result.runs[0].config.teacher is None and result.runs[0].config.method.name == "independent"
    for k in (1, 2):
        teacher = result.runs[k].config.teacher
        assert teacher.checkpoint == f"{result.runs[k - 1].storage.uri}/checkpoints/step_00000080/peer0.pt"
        assert all(r["kd"] > 0 for r in result.runs[k].records.to_pylist() if r["split"] == "train")
    rows = result.table.to_pylist()
    # Each generation's own accuracy is the one its run recorded at its last step...
    assert [r["accuracy"] for r in rows] == pytest.approx([run.final["peer_accuracy"][0] for run in result.runs])
    # ...and the ensemble row of generation 2 is the mean of the three generations' probabilities.
    from codistill.data import load_dataset
    from codistill.models import create_model

    data = load_dataset("mnist1d")
    logits = []
    for run in result.runs:
        net = create_model("mnist1d_cnn_narrow", 10).eval()
        net.load_state_dict(LocalCheckpoints(run.storage, 2).load_peer(80, 0)["model"])
        with torch.no_grad():
            logits.append(net(data.x_test))
    assert rows[2]["ensemble_accuracy"] == pytest.approx(ensemble_accuracy(logits, data.y_test))
    assert (tmp_path / "born_again_mnist1d" / GENERATIONS_FILE).exists()
    # A re-run resumes: every generation is finished, so nothing trains again (no step recorded
    # twice, no newer checkpoint) and the table is the same.
    again = run_generations(cfg, "local")
    assert again.table.to_pylist() == rows
    for first, second in zip(result.runs, again.runs):
        assert second.records.num_rows == first.records.num_rows
        assert LocalCheckpoints(second.storage, 2).complete_steps()[-1] == 80


def test_a_born_again_method_must_learn_from_a_teacher(tmp_path):
    with pytest.raises(ConfigError) as info:
        small_config(tmp_path, "born_again.method={name: dml}", base="configs/born_again_mnist1d.yaml")
    assert info.value.path == "born_again.method.name" and "kd" in info.value.message


def test_a_teacher_no_method_uses_is_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        small_config(tmp_path, "teacher={run: somewhere}")
    assert info.value.path == "teacher" and "learns from no teacher" in info.value.message
