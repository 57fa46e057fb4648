"""Logit regression, the feature-distillation overhaul, CRD (and factor transfer's pieces): each
loss against a hand-computed value, short runs of each on the local runner, and the state a
method keeps (CRD's memory banks) surviving a resume. The authors' numbers are in test_parity.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from codistill.engine.run import train
from codistill.methods import create_method
from codistill.methods.logit_regression import LogitRegressionConfig
from tests.conftest import signals, small_config


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A small teacher trained by codistill itself (the wide CNN, 100 steps)."""
    folder = tmp_path_factory.mktemp("teacher")
    return train(small_config(folder, "train.steps=100", "train.eval_every=100", "train.checkpoint_every=100",
                              base="configs/teacher_mnist1d_wide.yaml"), "local")


def student(tmp_path, teacher_run, *overrides):
    return small_config(tmp_path, f"teacher.run={teacher_run.storage.uri}", *overrides, base="configs/kd_mnist1d.yaml")


def train_rows(result):
    return [r for r in result.records.to_pylist() if r["split"] == "train"]


# --------------------------------------------------------------------------------------------
# Logit regression (Ba & Caruana 2014)


def test_logit_regression_by_hand():
    zs, zt, y = [[1.0, -2.0, 0.5]], [[0.0, 1.0, 2.5]], [2]
    l2 = 0.5 * sum((a - b) ** 2 for a, b in zip(zs[0], zt[0]))  # ½·Σ_c over the one row
    ce = -math.log(math.exp(0.5) / sum(math.exp(v) for v in zs[0]))
    s = signals(torch.tensor(zs), torch.tensor(y), teacher={"logits": torch.tensor(zt)})
    loss, terms = create_method(LogitRegressionConfig(name="logit_regression")).loss(s)
    assert float(terms["logit_l2"]) == pytest.approx(l2) and loss.item() == pytest.approx(l2)  # α = 1: no CE
    loss, _ = create_method(LogitRegressionConfig(name="logit_regression", alpha=0.25)).loss(s)
    assert loss.item() == pytest.approx(0.75 * ce + 0.25 * l2, rel=1e-6)
    # Between peers: the mean over the other peers of the same term; a batch averages its rows.
    z = torch.randn(4, 10)
    peers = [torch.randn(4, 10), torch.randn(4, 10)]
    method = create_method(LogitRegressionConfig(name="logit_regression", source="peers", alpha=0.5))
    _, terms = method.loss(signals(z, torch.zeros(4, dtype=torch.long), peers=peers))
    expected = sum(0.5 * (z - p).pow(2).sum(1).mean() for p in peers) / 2
    assert float(terms["logit_l2"]) == pytest.approx(expected.item(), rel=1e-6)
    assert method.needs.peers and not method.needs.teacher


@pytest.mark.slow
def test_logit_regression_trains_from_a_teacher_and_between_peers(tmp_path, teacher_run):
    result = train(student(tmp_path, teacher_run, "name=lr", "method={name: logit_regression}"), "local")
    rows = train_rows(result)
    assert all(r["loss"] == pytest.approx(r["logit_l2"], rel=1e-5) for r in rows)
    assert sum(r["logit_l2"] for r in rows[-10:]) < sum(r["logit_l2"] for r in rows[:10]) / 2
    assert result.final["peer_accuracy"][0] > 0.2  # the logits alone carry the labels
    peers = train(small_config(tmp_path, "name=lr_peers", "method={name: logit_regression, source: peers, alpha: 0.5}"),
                  "local")
    assert all(r["peers_used"] == 1 and r["logit_l2"] > 0 for r in train_rows(peers))


# --------------------------------------------------------------------------------------------
# The overhaul of feature distillation (Heo et al. 2019)


def test_overhaul_margin_and_partial_l2_by_hand():
    from codistill.methods.losses import batch_margin, negative_gaussian_mean, partial_l2

    # E[x | x < 0] for x ~ N(m, s²) = m − s·φ(m/s)/Φ(−m/s); N(0, 1): −φ(0)/½ = −√(2/π).
    phi = lambda v: math.exp(-v * v / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    m, s = torch.tensor([0.0, 1.0, 5.0]), torch.tensor([1.0, 2.0, 1.0])
    expected = [-math.sqrt(2 / math.pi), 1 - 2 * phi(0.5) / cdf(-0.5), -3.0]  # Φ(−5) < 0.001: −3s
    assert negative_gaussian_mean(m, s).tolist() == pytest.approx(expected, rel=1e-6)
    # Partial L2 on one channel with margin −1: targets below it are raised to it; positions where
    # the student is at or below a non-positive target count nothing.
    source = torch.tensor([[[0.5, -2.0, -3.0, 1.0]]])
    target = torch.tensor([[[-2.0, -0.5, -1.5, 2.0]]])  # → [−1, −0.5, −1, 2]
    counted = [(0.5 + 1) ** 2, 0.0, 0.0, (1.0 - 2.0) ** 2]
    assert partial_l2(source, target, torch.tensor([-1.0])).item() == pytest.approx(sum(counted))
    x = torch.randn(64, 3, 5) * 2 + 1  # batch statistics per channel → the same formula
    flat = x.transpose(0, 1).flatten(1)
    assert torch.allclose(batch_margin(x), negative_gaussian_mean(flat.mean(1), flat.std(1, unbiased=False)))


def test_overhaul_loss_weights_the_stages_and_reads_the_teacher_bn():
    from codistill.methods.losses import negative_gaussian_mean, partial_l2
    from codistill.methods.overhaul import CONNECTORS, OverhaulConfig

    method = create_method(OverhaulConfig(name="overhaul", taps=("a.pre", "b.pre"), weight=0.5))
    assert method.needs.teacher_norms == {"a.pre", "b.pre"}
    shapes = {"own": {"a.pre": (4, 8), "b.pre": (6, 4)}, "teacher": {"a.pre": (5, 8), "b.pre": (7, 2)}}
    network = method.build_network(torch.nn.Identity(), "x", shapes)
    taps = {"a.pre": torch.randn(3, 4, 8), "b.pre": torch.randn(3, 6, 4)}
    teacher = {"logits": torch.randn(3, 10), "a.pre": torch.randn(3, 5, 8), "b.pre": torch.randn(3, 7, 2),
               "norm.b.pre.weight": -torch.rand(7), "norm.b.pre.bias": torch.randn(7)}  # a BN before b only
    z, y = torch.randn(3, 10), torch.randint(0, 10, (3,))
    loss, terms = method.loss(signals(z, y, taps=taps, teacher=teacher, network=network))
    connectors = network.get_submodule(CONNECTORS)
    a = partial_l2(connectors["a_pre"](taps["a.pre"]), teacher["a.pre"],
                   negative_gaussian_mean(teacher["a.pre"].transpose(0, 1).flatten(1).mean(1),
                                          teacher["a.pre"].transpose(0, 1).flatten(1).std(1, unbiased=False)))
    b = partial_l2(connectors["b_pre"](taps["b.pre"]), teacher["b.pre"],  # pooled 4 → 2; |γ|
                   negative_gaussian_mean(teacher["norm.b.pre.bias"], teacher["norm.b.pre.weight"].abs()))
    expected = (a / 2 + b) / 3  # the deeper stage 1, the one before ½; over the batch of 3
    assert float(terms["overhaul"]) == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(F.cross_entropy(z, y).item() + 0.5 * expected.item(), rel=1e-5)


def test_the_teacher_serves_the_bn_before_a_pre_relu_tap():
    from codistill.engine.sources import FrozenTeacher
    from codistill.models import MODELS, create_model

    net = create_model("resnet20", 10)
    entry = MODELS["resnet20"]
    bn = net.get_submodule(entry.norms["stage3.pre"])
    assert isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == 64
    teacher = FrozenTeacher(net, {"stage3.pre": entry.taps["stage3.pre"]}, {"stage3.pre": entry.norms["stage3.pre"]})
    out = teacher.outputs(torch.randn(2, 3, 32, 32))
    assert out["stage3.pre"].shape == (2, 64, 8, 8)
    assert torch.equal(out["norm.stage3.pre.weight"], bn.weight) and torch.equal(out["norm.stage3.pre.bias"], bn.bias)


OVERHAUL = "method={name: overhaul, taps: [conv1.pre, conv2.pre, conv3.pre]}"


@pytest.mark.slow  # > 4 s: the full tier
def test_overhaul_trains_from_a_teacher_and_between_peers(tmp_path, teacher_run):
    result = train(student(tmp_path, teacher_run, "name=oh", OVERHAUL), "local")
    rows = train_rows(result)
    assert all(r["overhaul"] > 0 for r in rows)
    assert sum(r["overhaul"] for r in rows[-10:]) < sum(r["overhaul"] for r in rows[:10])
    peers = train(small_config(tmp_path, "name=oh_peers", OVERHAUL.replace("}", ", source: peers, weight: 0.01}")),
                  "local")
    assert all(r["peers_used"] == 1 and r["overhaul"] > 0 for r in train_rows(peers))


# --------------------------------------------------------------------------------------------
# Contrastive representation distillation (Tian et al. 2020)


def test_contrastive_nce_by_hand():
    from codistill.methods.losses import contrastive_nce

    scores, n, eps = torch.tensor([[0.5, 0.01, 0.2], [2.0, 0.3, 0.0]]), 10, 1e-7
    noise = 2 / n  # N·P_n: two negatives, uniform noise over the 10 examples
    expected = -sum(math.log(row[0] / (row[0] + noise + eps)) + sum(math.log(noise / (v + noise + eps)) for v in row[1:])
                    for row in scores.tolist()) / 2
    assert contrastive_nce(scores, n).item() == pytest.approx(expected, rel=1e-6)


def crd_network(labels, **settings):
    from codistill.methods.crd import CRDConfig

    method = create_method(CRDConfig(name="crd", feat_dim=4, **settings))
    shapes = {"own": {"penultimate": (6,)}, "teacher": {"penultimate": (5,)}, "train_labels": labels}
    return method, method.build_network(torch.nn.Module(), "x", shapes)


def test_crd_draws_negatives_of_other_classes_and_moves_the_banks():
    from codistill.methods.crd import CRD_MODULE

    labels = torch.arange(40) % 4
    method, network = crd_network(labels, negatives=7, momentum=0.25)
    memory = network.get_submodule(CRD_MODULE)
    indices = torch.tensor([3, 17, 22])
    contrast = memory.negatives(indices, 7, torch.Generator().manual_seed(1))
    assert contrast.shape == (3, 8) and torch.equal(contrast[:, 0], indices)
    assert not (labels[contrast[:, 1:]] == labels[indices][:, None]).any()
    assert torch.equal(contrast, memory.negatives(indices, 7, torch.Generator().manual_seed(1)))  # reproducible
    before = {k: v.clone() for k, v in memory.state_dict().items()}
    f_s, f_t = torch.randn(3, 6), torch.randn(3, 5)
    s = signals(torch.randn(3, 10), labels[indices] % 10, taps={"penultimate": f_s},
                teacher={"logits": torch.randn(3, 10), "penultimate": f_t}, network=network)
    s.indices = indices
    loss, terms = method.loss(s)
    loss.backward()
    assert memory.embed_student.weight.grad is not None and memory.embed_teacher.weight.grad is not None
    assert float(memory.z_student) > 0 and float(memory.z_teacher) > 0  # fixed on the first step
    v_s = F.normalize(memory.embed_student(f_s), dim=1).detach()
    expected = F.normalize(0.25 * before["memory_student"][indices] + 0.75 * v_s, dim=1)
    assert torch.allclose(memory.memory_student[indices], expected, atol=1e-6)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(memory.memory_student[untouched], before["memory_student"][untouched])
    assert {f"crd.{k}" for k in ("memory_student", "memory_teacher", "z_student", "z_teacher")} <= set(network.state_dict())
    z = float(memory.z_student)
    method.loss(s)
    assert float(memory.z_student) == z  # frozen after the first step


CRD = "method={name: crd, negatives: 256}"


@pytest.mark.slow  # > 4 s: the full tier
def test_a_resumed_crd_run_equals_an_uninterrupted_one(tmp_path, teacher_run):
    from codistill.engine.checkpoint import LocalCheckpoints

    whole = train(student(tmp_path, teacher_run, "name=whole", CRD), "local")
    rows = train_rows(whole)
    assert all(r["crd"] > 0 for r in rows)

    def crash(step, metrics):
        if step >= 100:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        train(student(tmp_path, teacher_run, "name=resumed", CRD), "local", on_progress=crash)
    resumed = train(student(tmp_path, teacher_run, "name=resumed", CRD), "local")
    assert resumed.final == whole.final
    losses = {r["step"]: (r["loss"], r["crd"]) for r in rows}
    again = train_rows(resumed)
    assert again and all((r["loss"], r["crd"]) == pytest.approx(losses[r["step"]], rel=1e-6) for r in again)
    # The banks travel in the peer's checkpoint, and were written to by the run.
    state = LocalCheckpoints(resumed.storage, keep=2).load_peer(120, 0)
    bank = state["model"]["crd.memory_student"]
    assert bank.shape == (4000, 128)  # one row per MNIST-1D training example
    # 120 batches of 100 visit every example: every row was replaced by a unit-norm update.
    assert torch.allclose(bank.norm(dim=1), torch.ones(4000), atol=1e-5)
    assert float(state["model"]["crd.z_student"]) > 0


def test_crd_between_peers_holds_a_memory_per_other_peer_and_averages_their_terms():
    from codistill.methods.crd import CRD_MODULE, CRDConfig

    labels = torch.arange(40) % 4
    method = create_method(CRDConfig(name="crd", source="peers", feat_dim=4, negatives=5))
    assert method.needs.peers and not method.needs.teacher and method.needs.taps == {"penultimate"}
    shapes = {"own": {"penultimate": (6,)}, "peers": [{"penultimate": (5,)}, {"penultimate": (3,)}],
              "train_labels": labels}
    network = method.build_network(torch.nn.Module(), "x", shapes)
    memories = network.get_submodule(CRD_MODULE)
    # One head per other peer, sized from that peer's own features (peers of different widths).
    assert [m.embed_teacher.in_features for m in memories] == [5, 3]
    f = torch.randn(3, 6)
    assert torch.equal(method.payload(torch.randn(3, 10), {"penultimate": f})["crd.features"], f)
    indices = torch.tensor([1, 9, 30])
    peers = [{"logits": torch.randn(3, 10), "crd.features": torch.randn(3, 5)},
             {"logits": torch.randn(3, 10), "crd.features": torch.randn(3, 3)}]
    s = signals(torch.randn(3, 10), labels[indices], taps={"penultimate": f}, network=network)
    s.peers, s.indices = peers, indices
    banks = {k: v.clone() for k, v in network.state_dict().items()}
    _, terms = method.loss(s)
    # By hand: each memory on its own (from the banks as they were), then the mean of the two.
    network.load_state_dict(banks)
    contrast = memories[0].negatives(indices, 5, s.generator())
    by_hand = sum(sum(m(f, p["crd.features"], indices, contrast)) for m, p in zip(memories, peers)) / 2
    assert float(terms["crd"]) == pytest.approx(float(by_hand.detach()), rel=1e-6)


@pytest.mark.slow  # > 3 s: the full tier
def test_crd_between_peers_of_different_widths_trains(tmp_path):
    result = train(small_config(tmp_path, "name=crd_peers", "peers.1.model=mnist1d_cnn_narrow",
                                "method={name: crd, source: peers, negatives: 64}"), "local")
    rows = train_rows(result)
    assert {r["peer"] for r in rows} == {0, 1} and all(r["crd"] > 0 for r in rows)
    assert sum(r["crd"] for r in rows[-20:]) < sum(r["crd"] for r in rows[:20])
    state = result.storage  # the heads of each peer read the other's width
    from codistill.engine.checkpoint import LocalCheckpoints

    widths = [LocalCheckpoints(state, keep=2).load_peer(120, k)["model"]["crd.0.embed_teacher.weight"].shape[1]
              for k in (0, 1)]
    assert widths[0] != widths[1]


def test_factor_distance_by_hand():
    from codistill.methods.losses import factor_distance

    a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0]])  # → [0.6, 0.8] and [0, 1]
    assert factor_distance(a, b).item() == pytest.approx((0.6 + 0.2) / 2)


# --------------------------------------------------------------------------------------------
# Factor transfer (Kim et al. 2018): the paraphraser stage, the translator, the loss


def test_factor_transfer_loss_is_ce_plus_beta_times_the_translated_factor_distance():
    from codistill.methods.ft import TRANSLATOR, FTConfig, Paraphraser
    from codistill.methods.losses import factor_distance

    method = create_method(FTConfig(name="ft", student_tap="conv3", teacher_tap="conv3"))
    network = method.build_network(torch.nn.Module(), "x", {"own": {"conv3": (8, 10)}, "teacher": {"conv3": (64, 5)}})
    translator = network.get_submodule(TRANSLATOR)
    f_s, factor, y = torch.randn(4, 8, 10), torch.randn(4, 32, 5), torch.tensor([0, 1, 2, 3])
    assert translator(f_s).shape == (4, 32, 5)  # k·C_t channels, pooled to the teacher's length
    logits = torch.randn(4, 10)
    s = signals(logits, y, taps={"conv3": f_s}, network=network,
                teacher={"logits": torch.randn(4, 10), "conv3": torch.randn(4, 64, 5), "ft.factor.conv3": factor})
    loss, terms = method.loss(s)
    distance = factor_distance(translator(f_s), factor).item()
    assert float(terms["ft"]) == pytest.approx(distance, rel=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item() + 500 * distance, rel=1e-6)  # β = 500
    # The paraphraser: its bottleneck is the factor (k·C channels, the map's size), its output the map's shape.
    stage = method.needs.teacher_stages[0]
    assert stage.taps <= method.needs.teacher_taps
    for shape in [(64, 5), (16, 4, 4)]:
        paraphraser = Paraphraser(shape, 0.5)
        t = torch.randn(3, *shape)
        assert paraphraser.encode(t).shape == (3, shape[0] // 2, *shape[1:]) and paraphraser(t).shape == t.shape
    served = stage.serve(stage.build({"conv3": (64, 5)}), {"conv3": torch.randn(3, 64, 5)})
    assert served["ft.factor.conv3"].shape == (3, 32, 5)


FT = "method={name: ft, student_tap: conv3, teacher_tap: conv3, paraphraser_steps: 60}"


def test_a_crash_in_the_paraphraser_stage_leaves_nothing_behind(tmp_path, teacher_run, monkeypatch):
    from codistill.engine.run import resolve_run
    from codistill.engine.stages import prepare_stages
    from codistill.methods.ft import ParaphraserStage

    calls = []

    def crashing_loss(self, module, teacher):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return original(self, module, teacher)

    original = ParaphraserStage.loss
    monkeypatch.setattr(ParaphraserStage, "loss", crashing_loss)
    cfg, storage = resolve_run(student(tmp_path, teacher_run, "name=crashed", FT))
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_stages(cfg, storage)
    assert storage.list("stages") == []  # written only when done: the next start trains it from the start


@pytest.mark.slow  # > 4 s: the full tier
def test_factor_transfer_trains_its_paraphraser_once_and_a_resume_equals_an_uninterrupted_run(tmp_path, teacher_run,
                                                                                              caplog):
    import io
    import logging
    import os

    import pyarrow.parquet as pq

    from codistill.engine.checkpoint import LocalCheckpoints
    from codistill.models import create_model

    whole = train(student(tmp_path, teacher_run, "name=whole", FT), "local")
    rows = train_rows(whole)
    assert all(r["ft"] > 0 for r in rows)
    files = whole.storage.list("stages")
    assert len(files) == 2 and files[0].startswith("paraphraser-")
    assert [f.rsplit(".", 1)[1] for f in files] == ["parquet", "pt"]
    # The stage's own records: its reconstruction loss per step, going down.
    losses = pq.read_table(io.BytesIO(whole.storage.read_bytes(f"stages/{files[0]}")))["loss"].to_pylist()
    assert len(losses) == 60 and sum(losses[-10:]) < sum(losses[:10])

    def crash(step, metrics):
        if step >= 100:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        train(student(tmp_path, teacher_run, "name=resumed", FT), "local", on_progress=crash)
    stored = next(f for f in os.listdir(tmp_path / "resumed" / "stages") if f.endswith(".pt"))
    assert stored == files[1]  # keyed by the teacher file's content and the settings: the same key
    before = os.stat(tmp_path / "resumed" / "stages" / stored).st_mtime_ns
    with caplog.at_level(logging.INFO, logger="codistill.engine.stages"):
        resumed = train(student(tmp_path, teacher_run, "name=resumed", FT), "local")
    assert os.stat(tmp_path / "resumed" / "stages" / stored).st_mtime_ns == before
    assert "not trained again" in caplog.text and "trained 60 steps" not in caplog.text
    assert resumed.final == whole.final
    losses = {r["step"]: (r["loss"], r["ft"]) for r in rows}
    again = train_rows(resumed)
    assert again and all((r["loss"], r["ft"]) == pytest.approx(losses[r["step"]], rel=1e-6) for r in again)
    # The paraphraser is the teacher's side: in neither the student's checkpoint nor its optimizer.
    state = LocalCheckpoints(resumed.storage, keep=2).load_peer(120, 0)
    student_keys = set(create_model("mnist1d_cnn_narrow", 10).state_dict())
    extra = set(state["model"]) - student_keys
    assert student_keys <= set(state["model"]) and extra and all(k.startswith("ft_translator.") for k in extra)
    trained = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert trained == sum(1 for k in state["model"] if not k.endswith(buffers))  # the student's and translator's
