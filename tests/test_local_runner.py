"""The local runner: learning, checkpoints, resume after a crash, records."""

import collections
import io
import threading

import pytest
import torch

from codistill.config import ExperimentConfig, build_dataclass
from codistill.engine.checkpoint import CHECKPOINT_FORMAT, LocalCheckpoints, from_bytes, peer_file
from codistill.engine.run import train
from codistill.methods import METHODS


def train_steps(records, peer):
    return [r["step"] for r in records.to_pylist() if r["split"] == "train" and r["peer"] == peer]


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
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


# Codistillation resumes exactly when its checkpoints fall on round boundaries (period 40 and a
# checkpoint every 40 steps): the resumed round is published again from the same weights.
@pytest.mark.parametrize("base,extra", [
    ("configs/dml_mnist1d.yaml", ()),
    pytest.param("configs/codistill_mnist1d.yaml", ("method.burn_in=0", "method.period=40", "method.max_staleness=0"),
                 marks=pytest.mark.slow),
], ids=["dml", "codistill"])
def test_a_crashed_run_resumes_from_its_checkpoint_and_ends_as_if_never_stopped(make_config, base, extra):
    reference = train(make_config("name=whole", *extra, base=base), "local")

    def crash_after_step_100(step, metrics):
        if step >= 100:
            raise Crash("simulated crash")

    with pytest.raises(Crash):  # checkpoints at 40 and 80, then the crash at step 100
        train(make_config("name=interrupted", *extra, base=base), "local", on_progress=crash_after_step_100)
    resumed = train(make_config("name=interrupted", *extra, base=base), "local")

    assert resumed.final == reference.final
    for peer in (0, 1):
        assert train_steps(resumed.records, peer) == list(range(1, 121))  # none lost, none twice
    losses = {(r["step"], r["peer"]): r["loss"] for r in reference.records.to_pylist() if r["split"] == "train"}
    for r in resumed.records.to_pylist():
        if r["split"] == "train":
            assert r["loss"] == pytest.approx(losses[(r["step"], r["peer"])], rel=1e-6, abs=1e-7)


def test_checkpoints_inside_codistillation_rounds_are_named_before_the_run(make_config, caplog):
    # A checkpoint every 40 steps with rounds of 30: a resume from step 40 or 80 would publish its
    # round again from later weights. Said once, before any step, with the values that resume exactly.
    with caplog.at_level("WARNING", logger="codistill.engine.stale_peers"):
        train(make_config("name=inside", "train.steps=20", "method.burn_in=0", "method.period=30",
                          base="configs/codistill_mnist1d.yaml"), "local")
    said = [r.getMessage() for r in caplog.records if r.name == "codistill.engine.stale_peers"]
    assert len(said) == 1 and "train.checkpoint_every=40" in said[0] and "period (30)" in said[0]
    assert "30 or 60 resume exactly" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="codistill.engine.stale_peers"):
        train(make_config("name=aligned", "train.steps=20", "method.burn_in=0", "method.period=20",
                          base="configs/codistill_mnist1d.yaml"), "local")
    assert not [r for r in caplog.records if r.name == "codistill.engine.stale_peers"]


def test_checkpoints_are_self_describing_and_load_with_weights_only(make_config):
    result = train(make_config("name=ckpt", "train.keep_checkpoints=2"), "local")
    checkpoints = LocalCheckpoints(result.storage, keep=2)
    assert checkpoints.complete_steps() == [80, 120]  # older ones pruned
    state = checkpoints.load_peer(120, 1)  # torch.load(weights_only=True) inside
    assert state["step"] == 120 and state["peer"] == 1 and state["model_name"] == "mnist1d_cnn"
    assert {"model", "optimizer", "torch_rng"} <= set(state)
    raw = torch.load(io.BytesIO(result.storage.read_bytes(f"checkpoints/step_00000120/{peer_file(1)}")), weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT  # written with its format: read back without a guess
    meta = from_bytes(result.storage.read_bytes("checkpoints/step_00000120/meta.pt"))
    assert build_dataclass(ExperimentConfig, meta["config"]) == result.config


def test_independent_peers_exchange_nothing_while_training(make_config):
    result = train(make_config("name=ind", "method={name: independent}"), "local")
    rows = [r for r in result.records.to_pylist() if r["split"] == "train"]
    assert all(r["exchange_ms"] == 0.0 for r in rows)
    counts = collections.Counter(r["peer"] for r in rows)
    assert counts == {0: 120, 1: 120}
    assert result.final["churn"] > 0  # independently initialised peers disagree somewhere


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_peers_of_different_architectures_learn_from_each_other(make_config):
    mutual = train(make_config("name=mixed", "peers.1.model=mnist1d_mlp"), "local")
    alone = train(make_config("name=mixed-alone", "peers.1.model=mnist1d_mlp", "method={name: independent}"), "local")
    assert len(mutual.final["peer_accuracy"]) == 2
    # Same seed, same batches, same initial weights: the MLP's own cross-entropy can only differ
    # after its first update if the CNN's predictions reached it.
    ce = {name: [r["ce"] for r in run.records.to_pylist() if r["split"] == "train" and r["peer"] == 1]
          for name, run in (("mutual", mutual), ("alone", alone))}
    assert ce["mutual"][0] == pytest.approx(ce["alone"][0], rel=1e-6)
    assert all(abs(a - b) > 1e-7 for a, b in zip(ce["mutual"][5:], ce["alone"][5:]))
    assert all(r["kl"] > 0 and r["peers_used"] == 1 for r in mutual.records.to_pylist() if r["split"] == "train")


def test_a_failing_peer_stops_the_run_with_its_error_instead_of_hanging_the_others(make_config, monkeypatch):
    from codistill.methods.dml import DML

    original = DML.loss

    def broken(self, s):
        if s.step == 10 and threading.current_thread().name == "peer1":
            raise ValueError("peer broke")
        return original(self, s)

    monkeypatch.setattr(DML, "loss", broken)
    with pytest.raises(ValueError, match="peer broke"):
        train(make_config("name=broken"), "local")


CNN, NARROW, MLP = ({"model": m} for m in ("mnist1d_cnn", "mnist1d_cnn_narrow", "mnist1d_mlp"))
# method → (method section, peers, whether it learns from a teacher). Feature-based methods
# need peers that declare the taps they name; FSP needs the teacher's width.
METHOD_SETTINGS = {
    "independent": ({"name": "independent"}, [CNN, MLP], False),
    "dml": ({"name": "dml"}, [CNN, MLP], False),
    "codistill": ({"name": "codistill", "period": 2, "burn_in": 0}, [CNN, MLP], False),
    "one": ({"name": "one", "branches": 1}, [CNN, MLP], False),
    "kdcl": ({"name": "kdcl", "variant": "linear"}, [CNN, MLP], False),
    "okddip": ({"name": "okddip"}, [CNN, MLP], False),
    "pcl": ({"name": "pcl"}, [CNN, MLP], False),
    "kd": ({"name": "kd", "noise_std": 0.1}, [CNN, MLP], True),
    "fitnets": ({"name": "fitnets", "student_tap": "conv2", "teacher_tap": "conv3", "hint_steps": 2}, [CNN, NARROW], True),
    "at": ({"name": "at", "taps": ["conv2", "conv3"]}, [CNN, NARROW], True),
    "fsp": ({"name": "fsp", "pairs": [["conv1", "conv2"]]}, [CNN, CNN], True),
    "logit_regression": ({"name": "logit_regression", "alpha": 0.5}, [CNN, MLP], True),
    "overhaul": ({"name": "overhaul", "taps": ["conv2.pre", "conv3.pre"]}, [CNN, NARROW], True),
    "crd": ({"name": "crd", "negatives": 64}, [CNN, MLP], True),
    "ft": ({"name": "ft", "student_tap": "conv3", "teacher_tap": "conv3", "paraphraser_steps": 3}, [CNN, NARROW], True),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_trains_two_peers(tmp_path, method):
    import torch

    from codistill.config import load_config
    from codistill.models import create_model

    assert method in METHOD_SETTINGS, f"add settings for the new method {method!r} here"
    settings, peers, taught = METHOD_SETTINGS[method]
    config = {"name": method, "method": settings, "peers": peers,
              "data": {"name": "synthetic", "batch_size": 50},
              "train": {"steps": 6, "eval_every": 3, "checkpoint_every": 0},
              "ray": {"storage_path": str(tmp_path)}}
    if taught:
        torch.save(create_model("mnist1d_cnn", 10).state_dict(), tmp_path / "teacher.pt")
        config["teacher"] = {"model": "mnist1d_cnn", "checkpoint": str(tmp_path / "teacher.pt")}
    result = train(load_config(config), "local")
    rows = [r for r in result.records.to_pylist() if r["split"] == "train"]
    assert len(rows) == 12 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows)  # finite, positive
    assert len(result.final["peer_accuracy"]) == 2
