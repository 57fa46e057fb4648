"""The local runner: learning, checkpoints, resume after a crash, records."""

import collections
import threading

import pytest

from codistill.config import ExperimentConfig, build_dataclass
from codistill.engine.checkpoint import LocalCheckpoints, from_bytes
from codistill.engine.run import train
from codistill.methods import METHODS


def train_steps(records, peer):
    return [r["step"] for r in records.to_pylist() if r["split"] == "train" and r["peer"] == peer]


def test_dml_peers_learn_mnist1d(make_config):
    result = train(make_config("name=learn", "train.steps=600", "train.eval_every=200"), "local")
    final = result.final
    assert final["step"] == 600
    assert min(final["peer_accuracy"]) > 0.7  # chance is 0.1
    assert final["ensemble_accuracy"] > 0.7
    assert 0 <= final["churn"] < 0.4
    assert "ensemble" in result.summary and "churn" in result.summary


class Crash(RuntimeError):
    pass


def test_a_crashed_run_resumes_from_its_checkpoint_and_ends_as_if_never_stopped(make_config):
    reference = train(make_config("name=whole"), "local")

    def crash_after_step_100(step, metrics):
        if step >= 100:
            raise Crash("simulated crash")

    with pytest.raises(Crash):  # checkpoints at 40 and 80, then the crash at step 100
        train(make_config("name=interrupted"), "local", on_progress=crash_after_step_100)
    resumed = train(make_config("name=interrupted"), "local")

    assert resumed.final == reference.final
    for peer in (0, 1):
        assert train_steps(resumed.records, peer) == list(range(1, 121))  # none lost, none twice
    losses = {(r["step"], r["peer"]): r["loss"] for r in reference.records.to_pylist() if r["split"] == "train"}
    for r in resumed.records.to_pylist():
        if r["split"] == "train":
            assert r["loss"] == pytest.approx(losses[(r["step"], r["peer"])], rel=1e-6, abs=1e-7)


def test_checkpoints_are_self_describing_and_load_with_weights_only(make_config):
    result = train(make_config("name=ckpt", "train.keep_checkpoints=2"), "local")
    checkpoints = LocalCheckpoints(result.storage, keep=2)
    assert checkpoints.complete_steps() == [80, 120]  # older ones pruned
    state = checkpoints.load_peer(120, 1)  # torch.load(weights_only=True) inside
    assert state["step"] == 120 and state["peer"] == 1 and state["model_name"] == "mnist1d_cnn"
    assert {"model", "optimizer", "torch_rng"} <= set(state)
    meta = from_bytes(result.storage.read_bytes("checkpoints/step_00000120/meta.pt"))
    assert build_dataclass(ExperimentConfig, meta["config"]) == result.config


def test_independent_peers_exchange_nothing_while_training(make_config):
    result = train(make_config("name=ind", "method={name: independent}"), "local")
    rows = [r for r in result.records.to_pylist() if r["split"] == "train"]
    assert all(r["exchange_ms"] == 0.0 for r in rows)
    counts = collections.Counter(r["peer"] for r in rows)
    assert counts == {0: 120, 1: 120}
    assert result.final["churn"] > 0  # independently initialised peers disagree somewhere


def test_peers_of_different_architectures_learn_from_each_other(make_config):
    result = train(make_config("name=mixed", "peers.1.model=mnist1d_mlp"), "local")
    assert len(result.final["peer_accuracy"]) == 2
    kl = [r["kl"] for r in result.records.to_pylist() if r["split"] == "train"]
    assert all(k >= 0 for k in kl) and max(kl) > 0


def test_a_failing_peer_stops_the_run_with_its_error_instead_of_hanging_the_others(make_config, monkeypatch):
    from codistill.methods.dml import DML

    original = DML.loss

    def broken(self, logits, peer_logits, labels, step):
        if step == 10 and threading.current_thread().name == "peer1":
            raise ValueError("peer broke")
        return original(self, logits, peer_logits, labels, step)

    monkeypatch.setattr(DML, "loss", broken)
    with pytest.raises(ValueError, match="peer broke"):
        train(make_config("name=broken"), "local")


METHOD_SETTINGS = {
    "independent": {"name": "independent"},
    "dml": {"name": "dml"},
    "codistill": {"name": "codistill", "period": 2, "burn_in": 0},
    "one": {"name": "one", "branches": 1},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_trains_two_peers(tmp_path, method):
    from codistill.config import load_config

    assert method in METHOD_SETTINGS, f"add settings for the new method {method!r} here"
    cfg = load_config({"name": method, "method": METHOD_SETTINGS[method],
                       "peers": [{"model": "mnist1d_cnn"}, {"model": "mnist1d_mlp"}],
                       "data": {"name": "synthetic", "batch_size": 50},
                       "train": {"steps": 6, "eval_every": 3, "checkpoint_every": 0},
                       "ray": {"storage_path": str(tmp_path)}})
    result = train(cfg, "local")
    rows = [r for r in result.records.to_pylist() if r["split"] == "train"]
    assert len(rows) == 12 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows)  # finite, positive
    assert len(result.final["peer_accuracy"]) == 2
