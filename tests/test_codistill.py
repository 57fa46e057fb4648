"""Codistillation: burn-in, stale teachers, bounded staleness, both exchange kinds, and one
objective (the KL to the peers' mean) whether the peers send whole logits or top-k targets."""

import threading
import time

import pytest
import torch

from codistill.engine import loop
from codistill.engine.run import train
from codistill.methods import create_method
from codistill.methods.codistill import CodistillConfig
from codistill.methods.dml import DMLConfig
from codistill.methods.losses import mean_payload_kl, mean_target_kl, top_k_kl, top_k_targets
from tests.conftest import signals

BASE = "configs/codistill_mnist1d.yaml"


def train_rows(result, peer=None):
    return [r for r in result.records.to_pylist() if r["split"] == "train" and (peer is None or r["peer"] == peer)]


def test_loss_is_ce_during_burn_in_then_distils_from_the_mean_stale_teacher():
    method = create_method(CodistillConfig(name="codistill", burn_in=10, temperature=2.0))
    z, a, b = torch.randn(3, 4, 10).unbind(0)
    y = torch.randint(0, 10, (4,))
    loss, terms = method.loss(signals(z, y, step=9, peers=[a, b]))
    assert terms["kl_weight"] == 0.0 and loss.item() == pytest.approx(torch.nn.functional.cross_entropy(z, y).item())
    loss, terms = method.loss(signals(z, y, step=10, peers=[a, b]))
    target = (torch.softmax(a / 2, -1) + torch.softmax(b / 2, -1)) / 2
    kl = 4 * torch.nn.functional.kl_div(torch.log_softmax(z / 2, -1), target, reduction="batchmean")
    assert float(terms["kl"]) == pytest.approx(kl.item(), rel=1e-5)


def three_peers(vocab=40, rows=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    own = torch.randn(rows, vocab, generator=g, dtype=torch.float64).requires_grad_()
    return own, [3 * torch.randn(rows, vocab, generator=g, dtype=torch.float64) for _ in range(3)]


def codistill_kl(own, peers, T=2.0):
    """The codistillation term of peer `own` (its gradient too) distilling from `peers`' payloads."""
    method = create_method(CodistillConfig(name="codistill", temperature=T))
    loss, terms = method.loss(signals(own, torch.zeros(len(own), dtype=torch.long), peers=peers))
    return terms["kl"], torch.autograd.grad(loss, own)[0]  # the same CE beside it in every call


def test_three_peers_top_k_with_k_the_vocabulary_is_the_whole_logit_objective():
    """Issue 39: with three peers, top-k targets of k = V are the whole distributions, and the
    objective must be the same one (the KL to the peers' mean) — in value and gradient."""
    own, others = three_peers()
    T = 2.0
    whole, whole_grad = codistill_kl(own, others, T)
    top, top_grad = codistill_kl(own, [top_k_targets(z, own.shape[1], T, torch.float64) for z in others], T)
    mean = torch.stack([torch.softmax(z / T, -1) for z in others]).mean(0)
    anil = T * T * torch.nn.functional.kl_div(torch.log_softmax(own.detach() / T, -1), mean, reduction="batchmean")
    assert float(whole) == pytest.approx(anil.item(), rel=1e-6)
    assert float(top) == pytest.approx(float(whole), rel=1e-6, abs=1e-6)
    assert torch.allclose(top_grad, whole_grad, rtol=0, atol=1e-6)


def test_three_peers_top_k_distils_toward_their_mean_with_each_tail_spread_over_its_unsent_tokens():
    """k < V: the teacher is the mean of the peers' distributions, each peer's tail mass spread
    evenly over the V − k tokens it did not send; the KL is over the union of the sent tokens
    plus one bucket for the rest. Written out here in float64; it is not the mean of the KLs to
    each peer (what top-k codistillation took before, and what DML still takes)."""
    own, others = three_peers(seed=1)
    T, k, V = 2.0, 6, own.shape[1]
    targets = [top_k_targets(z, k, T, torch.float64) for z in others]
    got, _ = codistill_kl(own, targets, T)
    dense = []
    for t in targets:
        p = (t["tail_logp"].exp() / (V - k)).expand(-1, V).clone()
        dense.append(p.scatter(-1, t["topk_ids"].long(), t["topk_logp"].exp()))
    mean = torch.stack(dense).mean(0)
    union = torch.zeros_like(mean, dtype=torch.bool)
    for t in targets:
        union.scatter_(-1, t["topk_ids"].long(), True)
    q = torch.softmax(own.detach() / T, -1)
    head = torch.where(union, mean * (mean / q).log(), 0).sum(-1)
    p_rest, q_rest = torch.where(union, 0, mean).sum(-1), torch.where(union, 0, q).sum(-1)
    expected = T * T * (head + p_rest * (p_rest / q_rest).log()).mean()
    assert (~union).any(dim=-1).all() and union.sum(-1).gt(k).all()  # the peers' supports differ
    assert float(got) == pytest.approx(expected.item(), rel=1e-5)
    mean_of_kls = mean_payload_kl(own, targets, T)
    assert abs(float(got) - mean_of_kls.item()) > 0.1 * mean_of_kls.item()
    _, dml_terms = create_method(DMLConfig(name="dml", temperature=T)).loss(
        signals(own, torch.zeros(len(own), dtype=torch.long), peers=targets))
    assert float(dml_terms["kl"]) == pytest.approx(mean_of_kls.item(), rel=1e-6)  # DML's objective is kept
    # One other peer (K = 2): the top-k KL as before, and chunks of rows change nothing.
    assert float(codistill_kl(own, targets[:1], T)[0]) == pytest.approx(top_k_kl(own, targets[0], T).item(), rel=1e-6)
    chunked = mean_target_kl(own, targets, T, chunk_elements=5 * V)
    unchunked = mean_target_kl(own, targets, T)
    assert chunked.item() == pytest.approx(unchunked.item(), rel=1e-6)
    assert torch.allclose(torch.autograd.grad(chunked, own)[0], torch.autograd.grad(unchunked, own)[0], atol=1e-7)


@pytest.mark.slow
def test_burn_in_means_no_distillation_and_no_exchange_before_it(make_config):
    result = train(make_config("name=burn", "train.steps=200", "method.burn_in=100", "method.period=20",
                               base=BASE), "local")
    for r in train_rows(result):
        step_index = r["step"] - 1
        if step_index < 100:
            assert r["kl_weight"] == 0.0 and r["kl"] == 0.0
        else:
            assert r["kl_weight"] > 0 and r["kl"] > 0
        if step_index < 100:  # rounds that end before the burn-in exchange nothing
            assert r["peers_used"] == 0 and r.get("round") is None
        if step_index == 100:  # the first round opens at the burn-in
            assert r["round"] == 5 and r["peers_used"] == 1


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_predictions_and_weights_give_the_same_teacher_when_period_is_one(make_config):
    common = ["train.steps=60", "method.burn_in=0", "method.period=1", "method.max_staleness=0"]
    by_predictions = train(make_config("name=p", "method.publish=predictions", *common, base=BASE), "local")
    by_weights = train(make_config("name=w", "method.publish=weights", *common, base=BASE), "local")
    for p, w in zip(train_rows(by_predictions), train_rows(by_weights)):
        assert (p["step"], p["peer"]) == (w["step"], w["peer"])
        assert p["kl"] == pytest.approx(w["kl"], rel=1e-4, abs=1e-6)
        assert p["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-6)
    assert by_weights.records.to_pylist()[0]["bytes_sent"] != by_predictions.records.to_pylist()[0]["bytes_sent"]


@pytest.mark.slow  # > 1.5 s: the full tier
def test_a_slowed_peer_never_makes_the_others_use_predictions_beyond_the_staleness_bound(make_config, monkeypatch):
    original = loop.train_step

    def slow_peer1(job, step):
        if threading.current_thread().name == "peer1":
            time.sleep(0.004)
        return original(job, step)

    monkeypatch.setattr(loop, "train_step", slow_peer1)
    result = train(make_config("name=slow", "train.steps=300", "method.burn_in=0", "method.period=10",
                               "method.max_staleness=1", base=BASE), "local")
    rounds = [r for r in train_rows(result) if r.get("round") is not None]
    assert len(rounds) == 2 * 30
    assert all(0 <= r["staleness_rounds"] <= 1 for r in rounds)
    fast = [r for r in rounds if r["peer"] == 0]
    assert any(r["staleness_rounds"] == 1 for r in fast)  # the fast peer did run ahead…
    assert sum(r["wait_ms"] for r in fast) > 0             # …and waited when the bound was hit
    assert all(r["missing_peers"] is None for r in rounds)


def test_shards_train_each_peer_on_its_own_data(make_config):
    result = train(make_config("name=shard", "data.shard=true", "train.steps=80", "method.burn_in=0",
                               "method.period=20", base=BASE), "local")
    assert result.final["step"] == 80
    rounds = [r for r in train_rows(result) if r.get("round") is not None]
    # Predictions cover both shards' batches: twice the bytes of the unsharded exchange.
    assert {r["bytes_sent"] for r in rounds} == {2 * 2 * 20 * 100 * 10 * 4}
