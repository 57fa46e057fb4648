import math

import pytest
import torch

from codistill.methods.losses import linear_rampup, mean_peer_kl, soft_kl
from codistill.methods import METHODS, create_method
from codistill.methods.dml import DMLConfig
from tests.conftest import signals


def test_dml_loss_matches_hand_computed_value():
    # Two classes, one sample, T = 2: every quantity small enough to write out.
    own = torch.tensor([[1.0, 0.0]], requires_grad=True)
    peer = torch.tensor([[0.0, 2.0]])
    label = torch.tensor([0])
    T = 2.0

    def softmax(a, b):
        e = [math.exp(a), math.exp(b)]
        return [v / sum(e) for v in e]

    ce = -math.log(softmax(1.0, 0.0)[0])
    p_peer, p_own = softmax(0.0, 1.0), softmax(0.5, 0.0)  # logits / T
    kl = sum(p * math.log(p / q) for p, q in zip(p_peer, p_own))
    expected = ce + 0.5 * T**2 * kl

    method = create_method(DMLConfig(name="dml", temperature=T, weight=0.5))
    loss, terms = method.loss(signals(own, label, peers=[peer]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert float(terms["kl"]) == pytest.approx(T**2 * kl, rel=1e-6)


def test_dml_averages_over_the_other_peers():
    torch.manual_seed(0)
    own, a, b = torch.randn(3, 8, 10).unbind(0)
    both = mean_peer_kl(own, [a, b], 3.0)
    assert both.item() == pytest.approx(0.5 * (mean_peer_kl(own, [a], 3.0) + mean_peer_kl(own, [b], 3.0)).item(), rel=1e-6)


def test_peer_logits_receive_no_gradient():
    own = torch.randn(4, 10, requires_grad=True)
    peer = torch.randn(4, 10, requires_grad=True)
    # The engine hands peers' payloads over detached; the loss must not re-attach them either.
    loss, _ = create_method(DMLConfig(name="dml", temperature=3.0)).loss(
        signals(own, torch.zeros(4, dtype=torch.long), peers=[peer.detach()]))
    loss.backward()
    assert own.grad is not None and own.grad.abs().sum() > 0
    assert peer.grad is None


def test_kl_of_identical_predictions_is_zero_and_scales_with_t_squared():
    z = torch.randn(5, 10)
    assert soft_kl(z, torch.softmax(z, -1), 1.0).item() == pytest.approx(0.0, abs=1e-6)
    # For a fixed pair of distributions at temperature T, the T² factor multiplies the KL.
    teacher = torch.softmax(torch.randn(5, 10) / 4.0, -1)
    assert soft_kl(z, teacher, 4.0).item() == pytest.approx(
        16 * torch.nn.functional.kl_div(torch.log_softmax(z / 4.0, -1), teacher, reduction="batchmean").item(), rel=1e-5)


def test_rampup_is_linear_then_flat():
    assert linear_rampup(0, 10) == pytest.approx(0.1)
    assert linear_rampup(4, 10) == pytest.approx(0.5)
    assert linear_rampup(50, 10) == 1.0
    assert linear_rampup(0, 0) == 1.0
    cfg = DMLConfig(name="dml", weight=2.0, rampup_steps=4)
    assert [cfg.weight_at(s) for s in range(5)] == [0.5, 1.0, 1.5, 2.0, 2.0]


def test_independent_ignores_peers_and_asks_for_nothing():
    method = create_method(METHODS["independent"].config_class(name="independent"))
    z, peer = torch.randn(2, 4, 10).unbind(0)
    y = torch.randint(0, 10, (4,))
    loss, _ = method.loss(signals(z, y, peers=[peer]))  # a peer's logits are there, and unused
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(z, y).item())
    assert not method.needs.peers and method.needs.rounds is None and not method.needs.teacher


def test_label_smoothing_reaches_every_cross_entropy_with_the_labels(tmp_path):
    """`train.label_smoothing`: a method's CE terms (its own, a teacher-weighted one, an
    ensemble's, each branch's) are taken against smoothed labels; and a run's config gets there."""
    import torch.nn.functional as F

    from codistill.config import load_config
    from codistill.engine.run import train
    from tests.conftest import REPO

    torch.manual_seed(0)
    logits, peer, labels = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.2)
    for name, extra in (("independent", {}), ("dml", {}), ("kd", {"teacher": {"logits": peer}})):
        s = signals(logits, labels, peers=[peer] if name == "dml" else (), **extra)
        s.label_smoothing = 0.2
        _, terms = create_method(METHODS[name].config_class(name=name)).loss(s)
        assert float(terms["ce"]) == pytest.approx(float(smoothed)), name
    ce = {}
    for smoothing in (0.0, 0.3):
        cfg = load_config(f"{REPO}/configs/dml_mnist1d.yaml", [
            f"name=ls{smoothing}", "train.steps=2", "train.eval_every=2", "train.checkpoint_every=0",
            f"ray.storage_path={tmp_path}", f"train.label_smoothing={smoothing}"])
        rows = train(cfg, "local").records.to_pylist()
        ce[smoothing] = [r["ce"] for r in rows if r["split"] == "train" and r["step"] == 1]
    assert all(a != pytest.approx(b) for a, b in zip(ce[0.0], ce[0.3]))  # same weights and batch: smoothed
