"""KDCL, OKDDip and PCL: each loss against a hand-computed value, the two forms (across peers,
branches of one network) training the same per-peer loss, PCL's temporal mean updating as its
formula says and resuming exactly."""

import math

import pytest
import torch
import torch.nn.functional as F

from codistill.config import load_config
from codistill.engine.run import train
from codistill.methods.losses import attention_weights, min_logit, min_loss_logits, simplex_combination
from codistill.methods import Signals, create_method
from codistill.methods.okddip import AttentionOutputs
from codistill.methods.pcl import SliceOutputs
from codistill.models.temporal_mean import LiveAndMean
from tests.conftest import small_config


def kl(p: list[float], q_logits: list[float], T: float) -> float:
    """T² · Σ p log(p / softmax(q/T)), one sample, by hand."""
    exps = [math.exp(v / T) for v in q_logits]
    q = [e / sum(exps) for e in exps]
    return T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def softmax(z: list[float], T: float = 1.0) -> list[float]:
    exps = [math.exp(v / T) for v in z]
    return [e / sum(exps) for e in exps]


# --- KDCL ------------------------------------------------------------------------------------

Z = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]],      # peer 0, two samples
                  [[1.0, 1.5, 0.0], [0.5, 0.0, 1.0]]])      # peer 1
Y = torch.tensor([0, 2])


def test_kdcl_min_logit_shifts_the_true_class_to_zero_and_takes_the_minimum():
    # sample 0 (y=0): peer 0 → [0, -2, -3], peer 1 → [0, 0.5, -1] → min [0, -2, -3]
    # sample 1 (y=2): peer 0 → [-3, -2, 0], peer 1 → [-0.5, -1, 0] → min [-3, -2, 0]
    assert min_logit(Z, Y).tolist() == [[0.0, -2.0, -3.0], [-3.0, -2.0, 0.0]]


def test_kdcl_min_loss_takes_each_samples_most_confident_member():
    # sample 0: CE of peer 0 (margin 2 over class 1) < peer 1's (class 1 wins) → peer 0's row;
    # sample 1: peer 0 puts 3 on y=2 against peer 1's 1 → peer 0's row as well; flip one to see peer 1
    assert min_loss_logits(Z, Y).tolist() == [[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]]
    flipped = Z.flip(0)
    assert min_loss_logits(flipped, Y).tolist() == [[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]]
    assert min_loss_logits(Z, torch.tensor([1, 0])).tolist() == [[1.0, 1.5, 0.0], [0.5, 0.0, 1.0]]


def test_kdcl_linear_weights_minimise_the_batch_loss_on_the_simplex():
    alpha = simplex_combination(Z, Y, iterations=200)
    assert alpha.sum().item() == pytest.approx(1.0) and (alpha >= 0).all()

    def batch_ce(a0: float) -> float:
        return F.cross_entropy(a0 * Z[0] + (1 - a0) * Z[1], Y).item()

    grid = min(batch_ce(i / 1000) for i in range(1001))  # the 1-D problem by brute force
    assert batch_ce(alpha[0].item()) == pytest.approx(grid, abs=1e-4)
    assert alpha[0] > 0.9  # peer 0 is right on both samples, peer 1 on none


def test_kdcl_loss_is_ce_plus_weighted_kl_to_the_mean_teacher():
    method = create_method(load_config({"name": "t", "method": {"name": "kdcl", "variant": "mean", "temperature": 2.0,
                                                                "weight": 0.5}, "peers": [{"model": "mnist1d_cnn"}] * 2}).method)
    own = Z[0].clone().requires_grad_()
    s = Signals(network=None, outputs=own, logits=own, labels=Y, step=0, peers=[{"logits": Z[1]}])
    loss, terms = method.loss(s)
    teacher = ((Z[0] + Z[1]) / 2).tolist()
    expected_kl = sum(kl(softmax(teacher[n], 2.0), Z[0, n].tolist(), 2.0) for n in range(2)) / 2
    expected = F.cross_entropy(Z[0], Y).item() + 0.5 * expected_kl
    assert terms["kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# --- OKDDip ----------------------------------------------------------------------------------


def test_okddip_attention_weights_are_a_softmax_of_query_key_products():
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[[2.0, 0.0]], [[0.0, 5.0]], [[1.0, 1.0]]])  # three members, one sample
    expected = softmax([2.0, 0.0, 1.0])
    assert attention_weights(q, keys)[0].tolist() == pytest.approx(expected)


def okddip_signals(method, peer: int, own_query, own_key, peers):
    own_logits = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    outputs = AttentionOutputs(own_logits, own_query, own_key)
    return Signals(network=None, outputs=outputs, logits=own_logits, labels=torch.tensor([0]), step=0, peer=peer,
                   peers=peers), own_logits


def test_okddip_auxiliary_peer_distils_from_its_attention_mix_and_the_leader_from_the_mean():
    cfg = load_config({"name": "t", "method": {"name": "okddip", "temperature": 1.0, "weight": 1.0},
                       "peers": [{"model": "mnist1d_cnn"}] * 3}).method
    method = create_method(cfg)
    other = {"logits": torch.tensor([[0.0, 2.0, 0.0]]), "key": torch.tensor([[0.0, 1.0]])}
    leader = {"logits": torch.tensor([[9.0, 9.0, 9.0]]), "key": torch.tensor([[7.0, 7.0]])}  # never used by peer 0
    q, k = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    s, own = okddip_signals(method, 0, q, k, [other, leader])
    _, terms = method.loss(s)
    a = softmax([0.0 * 1 + 2.0 * 0, 0.0 * 0 + 2.0 * 1])  # q·k_own = 0, q·k_other = 2
    target = [a[0] * 1.0 + a[1] * 0.0, a[0] * 0.0 + a[1] * 2.0, 0.0]
    assert terms["kl"].item() == pytest.approx(kl(softmax(target), [1.0, 0.0, 0.0], 1.0), rel=1e-5)
    # the leader (the last peer): the auxiliary peers' mean logits
    aux = [{"logits": torch.tensor([[1.0, 0.0, 0.0]]), "key": k}, {"logits": torch.tensor([[0.0, 2.0, 0.0]]), "key": k}]
    s, _ = okddip_signals(method, 2, q, k, aux)
    _, terms = method.loss(s)
    assert terms["kl"].item() == pytest.approx(kl(softmax([0.5, 1.0, 0.0]), [1.0, 0.0, 0.0], 1.0), rel=1e-5)


# --- PCL -------------------------------------------------------------------------------------


def test_pcl_ensemble_slices_are_one_linear_classifier_on_the_concatenated_features():
    torch.manual_seed(0)
    method = create_method(load_config({"name": "t", "method": {"name": "pcl"}, "peers": [{"model": "mnist1d_cnn"}] * 2}).method)
    from codistill.models import create_model

    nets = [method.build_network(create_model(m, 10), m) for m in ("mnist1d_cnn", "mnist1d_mlp")]
    x = torch.randn(4, 1, 40)
    features = [n.live.model.features(x) for n in nets]
    slices = [n.live.ensemble_slice for n in nets]
    W = torch.cat([s.weight for s in slices], dim=1)
    b = sum(s.bias for s in slices)
    summed = sum(n(x)[0][1] for n in nets)
    assert torch.allclose(summed, torch.cat(features, 1) @ W.T + b, atol=1e-5)


def test_pcl_loss_by_hand():
    method = create_method(load_config({"name": "t", "method": {"name": "pcl", "temperature": 2.0, "weight": 0.5},
                                        "peers": [{"model": "mnist1d_cnn"}] * 2}).method)
    z = torch.tensor([[1.0, 0.0, 0.0]])
    c_own, c_other = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    mean_other = torch.tensor([[0.0, 0.0, 3.0]])
    member = LiveAndMean(SliceOutputs(z, c_own), SliceOutputs(z, c_own))
    s = Signals(network=None, outputs=member, logits=z, labels=torch.tensor([0]), step=0,
                peers=[{"logits": z, "contribution": c_other, "mean_logits": mean_other}])
    loss, terms = method.loss(s)
    ensemble = [0.5, 1.5, 0.0]
    ce = -math.log(softmax([1.0, 0.0, 0.0])[0])
    ce_e = -math.log(softmax(ensemble)[0])
    kl_e = kl(softmax(ensemble, 2.0), [1.0, 0.0, 0.0], 2.0)
    kl_m = kl(softmax([0.0, 0.0, 3.0], 2.0), [1.0, 0.0, 0.0], 2.0)
    assert loss.item() == pytest.approx(ce + ce_e + 0.5 * (kl_e + kl_m), rel=1e-5)
    assert terms["ce_ensemble"].item() == pytest.approx(ce_e, rel=1e-5)


def test_pcl_temporal_mean_follows_its_formula_and_is_in_no_optimizer(tmp_path):
    from codistill.engine.job import build_peer
    from codistill.data import load_dataset

    cfg = load_config({"name": "t", "method": {"name": "pcl", "mean_decay": 0.5}, "peers": [{"model": "mnist1d_cnn"}] * 2})
    method = create_method(cfg.method)
    peer = build_peer(0, cfg.peers[0], load_dataset("synthetic"), 0, torch.device("cpu"), method)
    network = peer.network
    optimized = {id(p) for group in peer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in network.mean.parameters())
    assert all(id(p) in optimized for p in network.live.parameters())
    before = [p.clone() for p in network.mean.parameters()]
    with torch.no_grad():
        for p in network.live.parameters():
            p.add_(1.0)
    method.after_update(network, step=100)  # alpha = min(0.5, 101/110) = 0.5
    for old, mean, live in zip(before, network.mean.parameters(), network.live.parameters()):
        assert torch.allclose(mean, 0.5 * old + 0.5 * live)


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_pcl_resumed_run_equals_uninterrupted_including_the_temporal_mean(tmp_path):
    settings = ("method={name: pcl, mean_decay: 0.9}", "peers.1.model=mnist1d_mlp", "peers.*.optimizer.schedule=constant",
                "train.steps=80",
                "train.eval_every=40", "train.checkpoint_every=40")
    whole = train(small_config(tmp_path / "a", "name=whole", *settings), "local")
    train(small_config(tmp_path / "b", "name=split", *settings[:-3], "train.steps=40", "train.eval_every=40",
                       "train.checkpoint_every=40"), "local")
    resumed = train(small_config(tmp_path / "b", "name=split", *settings), "local")
    a = torch.load(tmp_path / "a/whole/checkpoints/step_00000080/peer0.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b/split/checkpoints/step_00000080/peer0.pt", weights_only=False)["model"]
    assert any(k.startswith("mean.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert whole.final["peer_accuracy"] == resumed.final["peer_accuracy"]


# --- one network of branches -----------------------------------------------------------------


@pytest.mark.parametrize("method_name", ["dml", "kdcl", "okddip", "pcl"])
def test_in_one_network_each_branch_gets_the_loss_it_would_get_across_peers(method_name):
    """The branched loss is the sum over branches of the per-peer loss with the other branches'
    detached payloads: checked by recomputing it branch by branch."""
    from codistill.models import create_model

    torch.manual_seed(0)
    cfg = load_config({"name": "t", "method": {"name": method_name, "branches": 3}, "peers": [{"model": "mnist1d_cnn"}]})
    method = create_method(cfg.method)
    network = method.build_network(create_model("mnist1d_cnn", 10), "mnist1d_cnn")
    x, y = torch.randn(8, 1, 40), torch.randint(0, 10, (8,))
    outputs = network(x)
    total, _ = method.loss(Signals(network=network, outputs=outputs, logits=method.logits(outputs), labels=y,
                                   step=5, peers=[]))
    members = method.members(outputs)
    # what each branch would send across workers
    payloads = [{n: t.detach() for n, t in method.own_payload(method.peer_logits(m), m, {}).items()} for m in members]
    by_hand = 0.0
    for k, member in enumerate(members):
        s = Signals(network=network, outputs=member, logits=method.peer_logits(member), labels=y, step=5, peer=k,
                    peers=[p for j, p in enumerate(payloads) if j != k])
        by_hand = by_hand + method.own_loss(s)[0]
    assert total.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert len(method.evaluation_members(method.evaluation_heads(outputs))) == 3


def test_branches_need_one_peer_of_a_model_that_can_branch():
    from codistill.config import ConfigError

    with pytest.raises(ConfigError, match="peers.*exactly one peer"):
        load_config({"name": "t", "method": {"name": "kdcl", "branches": 3}, "peers": [{"model": "mnist1d_cnn"}] * 2})
    with pytest.raises(ConfigError, match="method.also"):
        load_config({"name": "t", "method": {"name": "dml", "branches": 2, "also": [{"name": "at", "source": "peers",
                                                                                   "taps": ["conv2"]}]},
                     "peers": [{"model": "mnist1d_cnn"}]})


def test_okddip_gradients_stay_finite_when_its_live_target_underflows():
    """The attention mix is trained through; a peaked target (probabilities that underflow to 0
    in fp32) made the KL's gradient −∞ → NaN weights in tuning trials before the KL was taken
    from log-probabilities."""
    method = create_method(load_config({"name": "t", "method": {"name": "okddip", "temperature": 1.0},
                                        "peers": [{"model": "mnist1d_cnn"}] * 3}).method)
    own = torch.tensor([[200.0, -200.0, 0.0]], requires_grad=True)
    query = torch.tensor([[1.0, 0.0]], requires_grad=True)
    key = torch.tensor([[3.0, 0.0]], requires_grad=True)
    other = {"logits": torch.tensor([[-200.0, 200.0, 0.0]]), "key": torch.tensor([[0.0, 1.0]])}
    leader = {"logits": torch.zeros(1, 3), "key": torch.zeros(1, 2)}
    s = Signals(network=None, outputs=AttentionOutputs(own, query, key), logits=own, labels=torch.tensor([0]), step=0, peer=0,
                peers=[other, leader])
    loss, _ = method.loss(s)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(t.grad).all() for t in (own, query, key))
