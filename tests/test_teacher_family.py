"""The teacher→student family (KD, noisy teacher, FitNets, attention transfer, FSP) and the
seam that serves them: each loss against a hand-computed value, the frozen teacher, resume,
composition, a method defined outside codistill, and the errors a teacher that does not fit gives."""

import math

import pytest
import torch
import torch.nn.functional as F

from codistill.config import ConfigError, load_config
from codistill.engine.checkpoint import LocalCheckpoints
from codistill.engine.run import train
from codistill.methods.losses import attention_distance, attention_map, fsp_matrix
from codistill.methods import create_method
from codistill.methods.at import ATConfig
from codistill.methods.fitnets import FitNetsConfig, Regressor
from codistill.methods.fsp import FSPConfig
from codistill.methods.kd import KDConfig, perturb_logits
from codistill.models import create_model
from tests.conftest import REPO, signals

# --------------------------------------------------------------------------------------------
# Loss terms on small tensors


def softmax(values):
    e = [math.exp(v) for v in values]
    return [v / sum(e) for v in e]


def test_kd_matches_hand_computed_value():
    student, teacher, label, T, alpha = [1.0, 0.0], [0.0, 2.0], 0, 2.0, 0.75
    p_t, p_s = softmax([v / T for v in teacher]), softmax([v / T for v in student])
    kl = sum(p * math.log(p / q) for p, q in zip(p_t, p_s))
    ce = -math.log(softmax(student)[label])
    method = create_method(KDConfig(name="kd", temperature=T, alpha=alpha))
    loss, terms = method.loss(signals(torch.tensor([student]), torch.tensor([label]),
                                      teacher={"logits": torch.tensor([teacher])}))
    assert loss.item() == pytest.approx((1 - alpha) * ce + alpha * T**2 * kl, rel=1e-6)
    assert float(terms["kd"]) == pytest.approx(T**2 * kl, rel=1e-6)


def test_noisy_teacher_perturbs_logits_reproducibly_and_only_the_chosen_samples():
    z = torch.randn(1000, 10)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(perturb_logits(z, 0.5, 1.0, g()), perturb_logits(z, 0.5, 1.0, g()))
    assert torch.equal(perturb_logits(z, 0.0, 1.0, g()), z)
    noisy = perturb_logits(z, 0.5, 0.3, g())
    changed = (noisy != z).any(1).float().mean().item()
    assert 0.25 < changed < 0.35  # ≈ noise_prob of the samples
    ratio = (noisy / z)[(noisy != z).any(1)]  # z·(1 + ξ): one factor per perturbed sample
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-4)
    assert 0.4 < (ratio[:, 0] - 1).std().item() < 0.6
    kd = create_method(KDConfig(name="kd", noise_std=0.5))
    s = signals(torch.randn(8, 10), torch.zeros(8, dtype=torch.long), step=3, teacher={"logits": torch.randn(8, 10)})
    assert kd.loss(s)[0].item() == kd.loss(s)[0].item()  # the noise is a function of (seed, step, peer)
    assert kd.loss(s)[0].item() != create_method(KDConfig(name="kd")).loss(s)[0].item()


def test_attention_map_and_distance_match_the_paper_by_hand():
    a = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])  # (B=1, C=2, L=2)
    q = [(1 + 9) / 2, (4 + 0) / 2]  # mean over channels of the squares
    norm = math.sqrt(sum(v * v for v in q))
    assert attention_map(a)[0].tolist() == pytest.approx([v / norm for v in q])
    b = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    qb = [0.0, 1.0]
    expected = sum((x / norm - y) ** 2 for x, y in zip(q, qb)) / 2
    assert attention_distance(attention_map(a), attention_map(b)).item() == pytest.approx(expected, rel=1e-6)
    # Maps of another size are resized (and normalised again) to the receiving network's size.
    big = torch.randn(3, 4, 10)
    small = torch.randn(3, 7, 5)
    assert attention_distance(attention_map(small), attention_map(big)).item() >= 0
    assert attention_distance(attention_map(big), attention_map(big)).item() == pytest.approx(0, abs=1e-9)


def test_attention_transfer_loss_is_half_beta_times_the_sum_over_taps():
    taps = {"conv2": torch.randn(4, 5, 10), "conv3": torch.randn(4, 5, 5)}
    teacher = {"logits": torch.randn(4, 10), "conv2": torch.randn(4, 9, 10), "conv3": torch.randn(4, 9, 5)}
    method = create_method(ATConfig(name="at", taps=("conv2", "conv3"), weight=1000.0))
    z, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    loss, terms = method.loss(signals(z, y, taps=taps, teacher=teacher))
    at = sum(attention_distance(attention_map(taps[t]), attention_map(teacher[t])) for t in taps)
    assert loss.item() == pytest.approx(F.cross_entropy(z, y).item() + 500 * at.item(), rel=1e-6)


def test_fsp_matrix_by_hand():
    f1 = torch.tensor([[[1.0, 2.0], [0.0, 1.0]]])  # (B=1, C1=2, L=2)
    f2 = torch.tensor([[[3.0, 1.0]]])               # (B=1, C2=1, L=2)
    # G[i, j] = mean over positions of f1[i] · f2[j]
    assert fsp_matrix(f1, f2).tolist() == [[[(1 * 3 + 2 * 1) / 2], [(0 * 3 + 1 * 1) / 2]]]
    pooled = fsp_matrix(torch.ones(2, 3, 8), torch.ones(2, 4, 4))  # the longer map is pooled first
    assert pooled.shape == (2, 3, 4) and torch.allclose(pooled, torch.ones(2, 3, 4))


def test_fsp_loss_and_its_first_stage():
    taps = {"conv1": torch.randn(2, 3, 8), "conv2": torch.randn(2, 3, 4)}
    teacher = {"logits": torch.randn(2, 10), "conv1": torch.randn(2, 3, 8), "conv2": torch.randn(2, 3, 4)}
    method = create_method(FSPConfig(name="fsp", pairs=(("conv1", "conv2"),), weight=2.0, fsp_steps=5))
    fsp = (fsp_matrix(taps["conv1"], taps["conv2"]) - fsp_matrix(teacher["conv1"], teacher["conv2"])).pow(2).mean()
    z, y = torch.randn(2, 10), torch.randint(0, 10, (2,))
    assert method.loss(signals(z, y, step=4, taps=taps, teacher=teacher))[0].item() == pytest.approx(fsp.item(), rel=1e-6)
    after = method.loss(signals(z, y, step=5, taps=taps, teacher=teacher))[0].item()
    assert after == pytest.approx(F.cross_entropy(z, y).item() + 2 * fsp.item(), rel=1e-6)


def test_fitnets_regressor_maps_to_the_hint_and_the_hint_stage_trains_the_hint_alone():
    assert Regressor((8, 10), (64, 5))(torch.randn(3, 8, 10)).shape == (3, 64, 5)  # 1×1 conv + pooling
    assert Regressor((100,), (25, 10))(torch.randn(3, 100)).shape == (3, 25, 10)  # vector → map
    method = create_method(FitNetsConfig(name="fitnets", student_tap="conv2", teacher_tap="conv2", weight=3.0,
                                         hint_steps=10))
    network = torch.nn.Module()
    regressor = Regressor((4, 6), (5, 6))
    network.add_module("fitnets_regressor", regressor)
    h, hint = torch.randn(2, 4, 6), torch.randn(2, 5, 6)
    z, y = torch.randn(2, 10), torch.randint(0, 10, (2,))
    expected = 0.5 * (regressor(h) - hint).pow(2).mean()
    s = dict(taps={"conv2": h}, teacher={"logits": torch.randn(2, 10), "conv2": hint}, network=network)
    assert method.loss(signals(z, y, step=9, **s))[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert method.loss(signals(z, y, step=10, **s))[0].item() == pytest.approx(
        F.cross_entropy(z, y).item() + 3 * expected.item(), rel=1e-6)


def test_terms_compose_from_the_config():
    kd_at = create_method(load_config({
        "method": {"name": "kd", "also": [{"name": "at", "taps": ["conv2"]}]}, "peers": [{"model": "mnist1d_cnn"}],
        "teacher": {"model": "mnist1d_cnn_wide", "checkpoint": "unused.pt"}}).method)
    assert kd_at.needs.teacher and kd_at.needs.taps == {"conv2"} and kd_at.needs.teacher_taps == {"conv2"}
    taps, teacher = {"conv2": torch.randn(4, 5, 10)}, {"logits": torch.randn(4, 10), "conv2": torch.randn(4, 9, 10)}
    z, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    loss, terms = kd_at.loss(signals(z, y, taps=taps, teacher=teacher))
    kd_alone = create_method(KDConfig(name="kd")).loss(signals(z, y, teacher=teacher))[0]
    at_alone = create_method(ATConfig(name="at", taps=("conv2",))).distill_terms(signals(z, y, taps=taps, teacher=teacher))[0]
    assert loss.item() == pytest.approx(kd_alone.item() + at_alone.item(), rel=1e-6)
    assert {"kd", "at", "ce", "loss"} <= set(terms)
    dml_at = create_method(load_config({
        "method": {"name": "dml", "also": [{"name": "at", "source": "peers", "taps": ["conv2", "conv3"]}]},
        "peers": [{"model": "mnist1d_cnn"}, {"model": "mnist1d_cnn_narrow"}]}).method)
    assert dml_at.needs.peers and not dml_at.needs.teacher
    sent = dml_at.payload(torch.randn(4, 10), {"conv2": torch.randn(4, 5, 10), "conv3": torch.randn(4, 5, 5)})
    assert set(sent) == {"logits", "attention.conv2", "attention.conv3"}


# --------------------------------------------------------------------------------------------
# The frozen teacher in real runs


def short(tmp_path, *overrides, base="configs/kd_mnist1d.yaml"):
    from tests.conftest import small_config

    return small_config(tmp_path, *overrides, base=base)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A small teacher trained by codistill itself (the wide CNN, 200 steps)."""
    folder = tmp_path_factory.mktemp("teacher")
    return train(short(folder, "train.steps=200", "train.eval_every=100", base="configs/teacher_mnist1d_wide.yaml"),
                 "local")


def test_a_student_learns_from_a_frozen_teacher_that_never_changes(tmp_path, teacher_run):
    cfg = short(tmp_path, "name=kd", f"teacher.run={teacher_run.storage.uri}")
    result = train(cfg, "local")
    teacher_file = result.config.teacher.checkpoint
    assert teacher_file.endswith("checkpoints/step_00000200/peer0.pt")  # resolved to the newest checkpoint
    rows = [r for r in result.records.to_pylist() if r["split"] == "train"]
    assert all(r["kd"] > 0 and r["teacher_ms"] > 0 for r in rows)
    # The teacher is in no checkpoint: a student's state holds its own network's tensors only.
    state = LocalCheckpoints(result.storage, keep=2).load_peer(120, 0)
    student_keys = set(create_model("mnist1d_cnn_narrow", 10).state_dict())
    assert set(state["model"]) == student_keys
    # ...and it never trained: its weights file is untouched and loads to the same tensors.
    from codistill.engine.teacher import load_teacher

    network = load_teacher(result.config.teacher, 10, torch.device("cpu"))
    assert not any(p.requires_grad for p in network.parameters()) and not network.training


def test_the_teacher_gets_no_gradient_and_is_not_in_the_optimizer(tmp_path, teacher_run):
    from codistill.data import load_dataset
    from codistill.engine.job import make_job, peer_schedules
    from codistill.engine.loop import train_step
    from codistill.engine.run import resolve_run
    from codistill.exchange import LocalGatherHub

    cfg, _ = resolve_run(short(tmp_path, "name=grad", f"teacher.run={teacher_run.storage.uri}",
                               "method.also=[{name: at, taps: [conv2]}]"))
    data = load_dataset("mnist1d")
    job = make_job(cfg, 0, data, peer_schedules(cfg, len(data.y_train)), torch.device("cpu"),
                   LocalGatherHub(1).exchange_for(0))
    teacher = job.sources[0].network
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    train_step(job, 0)
    assert all(p.grad is None for p in teacher.parameters())
    optimised = {id(p) for group in job.peer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.slow  # > 1.5 s: the full tier
def test_a_resumed_kd_run_equals_an_uninterrupted_one(tmp_path, teacher_run):
    teacher = f"teacher.run={teacher_run.storage.uri}"
    whole = train(short(tmp_path, "name=whole", teacher, "method.noise_std=0.2"), "local")

    def crash(step, metrics):
        if step >= 100:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        train(short(tmp_path, "name=resumed", teacher, "method.noise_std=0.2"), "local", on_progress=crash)
    resumed = train(short(tmp_path, "name=resumed", teacher, "method.noise_std=0.2"), "local")
    assert resumed.final == whole.final
    losses = {(r["step"], r["peer"]): r["loss"] for r in whole.records.to_pylist() if r["split"] == "train"}
    for r in resumed.records.to_pylist():
        if r["split"] == "train":
            assert r["loss"] == pytest.approx(losses[(r["step"], r["peer"])], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_fitnets_and_fsp_train_with_their_first_stage(tmp_path, teacher_run):
    teacher = f"teacher.run={teacher_run.storage.uri}"
    fitnets = train(short(tmp_path, "name=fitnets", teacher, "method={name: fitnets, student_tap: conv2, "
                          "teacher_tap: conv2, hint_steps: 40}"), "local")
    rows = [r for r in fitnets.records.to_pylist() if r["split"] == "train"]
    assert all(r["loss"] == pytest.approx(r["hint"], rel=1e-5) for r in rows if r["step"] <= 40)
    hints = [r["hint"] for r in rows]
    assert sum(hints[30:40]) < sum(hints[:10])  # the regressor and the guided layers do learn the hint
    # FSP needs the teacher's width: the narrow student and the wide teacher do not fit, and the
    # error says so before anything is written.
    with pytest.raises(ConfigError) as info:
        train(short(tmp_path, "name=fsp", teacher, "method={name: fsp, pairs: [[conv1, conv2]]}"), "local")
    assert info.value.path == "method.pairs" and "same channels" in info.value.message


def test_a_teacher_that_does_not_fit_names_the_teacher_key(tmp_path, teacher_run):
    # Input kind: an image model cannot teach MNIST-1D.
    with pytest.raises(ConfigError) as info:
        short(tmp_path, "teacher={model: resnet20, checkpoint: x.pt}")
    assert info.value.path == "teacher.model" and "image" in info.value.message
    # Classes: a 7-class teacher for a 10-class data set.
    torch.save(create_model("mnist1d_cnn", 7).state_dict(), tmp_path / "seven.pt")
    with pytest.raises(ConfigError) as info:
        train(short(tmp_path, "name=seven", f"teacher={{model: mnist1d_cnn, checkpoint: {tmp_path}/seven.pt}}"), "local")
    assert info.value.path == "teacher.model" and "7 classes" in info.value.message
    assert not (tmp_path / "seven").exists()  # refused before anything was written
    # Another model's weights, an unreadable file, a run that is not there, a missing section.
    with pytest.raises(ConfigError, match="teacher.model: the weights .* are not model 'mnist1d_mlp'"):
        train(short(tmp_path, "name=mlp", f"teacher={{model: mnist1d_mlp, checkpoint: {tmp_path}/seven.pt}}"), "local")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="teacher.checkpoint: cannot load"):
        train(short(tmp_path, "name=junk", f"teacher={{model: mnist1d_cnn, checkpoint: {tmp_path}/junk.pt}}"), "local")
    with pytest.raises(ConfigError, match="teacher.run: no codistill run"):
        train(short(tmp_path, "name=norun", "teacher.run=never_trained"), "local")
    with pytest.raises(ConfigError) as info:
        short(tmp_path, "teacher=null")
    assert info.value.path == "teacher" and "kd" in info.value.message
    with pytest.raises(ConfigError) as info:
        train(short(tmp_path, "name=peer3", "teacher.peer=3", f"teacher.run={teacher_run.storage.uri}"), "local")
    assert info.value.path == "teacher.peer" and "has 1 peers" in info.value.message
    # A peer file names the model it holds (the file alone rebuilds it): another model is refused by name.
    peer_file = f"{teacher_run.storage.path('checkpoints')}/step_00000200/peer0.pt"
    with pytest.raises(ConfigError, match="teacher.model: .*holds model 'mnist1d_cnn_wide' built with"):
        train(short(tmp_path, "name=other", f"teacher={{model: mnist1d_cnn, checkpoint: {peer_file}}}"), "local")


def test_a_checkpoint_resumes_only_into_the_model_it_holds(teacher_run):
    """The peer file carries its model's name and arguments; a job of another model is refused
    before any weight is loaded (the run's stored config is checked first, this is the file's word)."""
    from types import SimpleNamespace

    from codistill.engine.checkpoint import load_peer_state, registered_model
    from codistill.errors import RunError

    state = LocalCheckpoints(teacher_run.storage, 1).load_peer(200, 0)
    name, args, weights = registered_model(state)
    assert name == "mnist1d_cnn_wide" and weights.keys() == create_model(name, 10, **args).state_dict().keys()
    other = SimpleNamespace(peer=SimpleNamespace(index=0, spec=SimpleNamespace(model="mnist1d_cnn", model_args={})))
    with pytest.raises(RunError, match="holds model 'mnist1d_cnn_wide'.*asks for 'mnist1d_cnn'"):
        load_peer_state(other, state)


def test_a_checkpoint_of_branches_is_refused_as_a_teacher_by_its_error_type(tmp_path):
    """A network of branches is the file's fault (`teacher.checkpoint`), another model the model's
    (`teacher.model`): told apart by the error's type, not by its wording."""
    from codistill.engine.checkpoint import BranchedNetwork, NotOneModel, registered_model

    branched = {"model": {"trunk.weight": torch.zeros(1)}, "step": 1, "base_prefix": None}
    with pytest.raises(BranchedNetwork):
        registered_model(branched)
    with pytest.raises(NotOneModel) as info:
        registered_model({"weight": torch.zeros(1)})  # a plain state dict, no model named
    assert not isinstance(info.value, BranchedNetwork)
    torch.save(branched, tmp_path / "branches.pt")
    with pytest.raises(ConfigError) as info:
        train(short(tmp_path, "name=branched", f"teacher={{model: mnist1d_cnn, checkpoint: {tmp_path}/branches.pt}}"),
              "local")
    assert info.value.path == "teacher.checkpoint" and "network of branches" in info.value.message


def test_a_method_defined_outside_codistill_trains_through_the_seam(tmp_path):
    cfg = load_config(f"{REPO}/configs/dml_mnist1d.yaml", [
        "name=seam", "imports=[tests.seam_method]", "method={name: test_tap_agreement, tap: conv2}",
        "train.steps=60", "train.eval_every=30", "train.checkpoint_every=30", f"ray.storage_path={tmp_path}"])
    result = train(cfg, "local")
    rows = [r for r in result.records.to_pylist() if r["split"] == "train"]
    assert all(r["agreement"] > 0 and r["peers_used"] == 1 for r in rows)
    assert result.final["step"] == 60


def test_engine_names_no_method():
    """engine/ serves what methods declare; it never asks for one by name (a string, a class or
    a config class of any registered method, or a method module)."""
    import pathlib
    import re

    from codistill.methods import METHODS

    classes = {c.__name__ for _, m in METHODS.items() for c in (m, m.config_class)}
    for path in pathlib.Path(REPO, "codistill", "engine").glob("*.py"):
        text = path.read_text()
        quoted = {n for n in METHODS.names() if re.search(rf"""["']{n}["']""", text)}
        named = classes & set(re.findall(r"[A-Za-z_]+", text))
        modules = {n for n in METHODS.names() if f"codistill.methods.{n}" in text}
        assert not (quoted | named | modules), f"{path.name} names {sorted(quoted | named | modules)}"
