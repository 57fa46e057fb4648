"""ONE (Lan et al. 2018): gate, ensemble, detached teacher, branch structure, both modes."""

import pytest
import torch

from codistill.config import ConfigError, load_config
from codistill.engine.run import train
from codistill.methods.losses import gated_ensemble
from codistill.methods import create_method
from codistill.methods.one import ONEConfig
from codistill.models import create_model
from codistill.models.multi_branch import BranchOutputs, GatedOutputs, make_multi_branch
from tests.conftest import signals


def test_the_ensemble_is_the_gate_weighted_sum_of_the_members():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5)  # 3 members, batch 4, 5 classes
    gates = torch.randn(4, 3)
    weights = torch.softmax(gates, -1)
    by_hand = torch.stack([sum(weights[b, k] * logits[k, b] for k in range(3)) for b in range(4)])
    assert torch.allclose(gated_ensemble(logits, gates), by_hand, atol=1e-6)


def test_branch_parameters_are_distinct_and_the_trunk_is_shared():
    torch.manual_seed(0)
    net = make_multi_branch(create_model("resnet20", 10), "resnet20", branches=3)
    trunk_params = {id(p) for p in net.trunk.parameters()}
    branch_params = [{id(p) for p in b.parameters()} for b in net.branches]
    assert all(not (trunk_params & b) for b in branch_params)
    assert all(not (branch_params[i] & branch_params[j]) for i in range(3) for j in range(i + 1, 3))
    first = [p for p in net.branches[0].parameters()][0]
    second = [p for p in net.branches[1].parameters()][0]
    assert not torch.equal(first, second)  # copies are re-initialised
    out = net(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (3, 2, 10) and out.gate_logits.shape == (2, 3)
    # Every branch's gradient flows into the one shared trunk.
    out.logits.sum().backward()
    assert all(p.grad is not None for p in net.trunk.parameters())


def test_a_single_branch_is_a_standalone_network_with_the_same_predictions():
    net = make_multi_branch(create_model("mnist1d_cnn", 10), "mnist1d_cnn", branches=3).eval()
    x = torch.randn(5, 1, 40)
    student = net.single_branch(2).eval()
    assert torch.allclose(student(x), net(x).logits[2], atol=1e-6)


def test_the_ensemble_teacher_is_detached_from_the_distillation_term():
    method = create_method(ONEConfig(name="one", branches=3, temperature=3.0))
    logits = torch.randn(3, 4, 10, requires_grad=True)
    gates = torch.randn(4, 3, requires_grad=True)
    labels = torch.randint(0, 10, (4,))
    out = BranchOutputs(logits, gates)
    _, terms = method.loss(signals(method.logits(out), labels, outputs=out))
    # Recompute only the KL term: if the target were live, the gate would get a gradient from it.
    from codistill.methods.losses import soft_kl, soft_targets

    target = soft_targets(gated_ensemble(logits, gates).detach(), 3.0)
    kl = sum(soft_kl(z, target, 3.0) for z in logits)
    assert kl.item() == pytest.approx(float(terms["kl"]), rel=1e-6)
    kl.backward()
    assert gates.grad is None
    # ...while the full loss does train the gate, through the ensemble's own CE.
    logits.grad = None
    out = BranchOutputs(logits, gates)
    loss, _ = method.loss(signals(method.logits(out), labels, outputs=out))
    loss.backward()
    assert gates.grad is not None and gates.grad.abs().sum() > 0


def test_across_peers_each_peer_gets_gradient_only_through_its_own_outputs():
    method = create_method(ONEConfig(name="one", branches=1))
    own_logits = torch.randn(4, 10, requires_grad=True)
    own_gate = torch.randn(4, 1, requires_grad=True)
    received = {"logits": torch.randn(4, 10, requires_grad=True), "gate": torch.randn(4, 1, requires_grad=True)}
    sent = method.payload(GatedOutputs(own_logits, own_gate), {})  # what this peer sends: named, detached
    assert set(sent) == {"logits", "gate"} and not sent["logits"].requires_grad
    out = GatedOutputs(own_logits, own_gate)
    loss, terms = method.loss(signals(own_logits, torch.randint(0, 10, (4,)), outputs=out,
                                      peers=[{k: v.detach() for k, v in received.items()}]))
    loss.backward()
    assert own_logits.grad is not None and own_gate.grad is not None
    assert received["logits"].grad is None and received["gate"].grad is None


def test_config_checks_which_one_is_meant():
    base = {"method": {"name": "one", "branches": 3}, "peers": [{"model": "mnist1d_cnn"}] * 2}
    with pytest.raises(ConfigError, match="branches: 1"):
        load_config(base)
    with pytest.raises(ConfigError) as info:
        load_config({"method": {"name": "one", "branches": 1}, "peers": [{"model": "mnist1d_cnn"}]})
    assert info.value.path == "peers"
    with pytest.raises(ConfigError) as info:
        load_config({"method": {"name": "one", "branches": 2}, "peers": [{"model": "tv_resnet18"}],
                     "data": {"name": "synthetic_images"}})
    assert info.value.path == "peers.0.model" and "resnet20" in info.value.message


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_one_in_one_network_reports_every_branch_and_the_ensemble(make_config):
    result = train(make_config("name=one", base="configs/one_mnist1d.yaml"), "local")
    test_rows = [r for r in result.records.to_pylist() if r["split"] == "test"]
    last = test_rows[-1]
    assert {"branch0_accuracy", "branch1_accuracy", "branch2_accuracy"} <= set(last)
    assert last["accuracy"] > 0.3 and min(last[f"branch{k}_accuracy"] for k in range(3)) > 0.3
