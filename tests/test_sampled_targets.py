"""Sampled soft targets (`exchange.targets: sampled`, `-k sampled`): their expectation is the whole
distribution, the expectation of their KL's gradient is the whole KL's (also toward the mean of
two peers, codistillation's teacher), they fit top-k's bytes, they are taken in chunks like the
other targets, the setting is checked, and peers train with them."""

from __future__ import annotations

import math

import pytest
import torch

from codistill.config import ConfigError, load_config
from codistill.methods.losses import mean_target_kl, payload_kl, soft_kl, soft_targets, top_k_targets
from codistill.methods.sampled_targets import empirical_distribution, sampled_draws, sampled_targets
from tests.conftest import REPO, small_config

LM = "configs/codistill_lm_stdlib.yaml"
Z_BOUND = 5.0
"""Tolerance of the statistical tests, in standard errors. Each checked coordinate is a mean of
thousands of independent draws, so its error is close to normal: |z| > 5 has probability 5.7e-7,
and over the ≤ 60 coordinates a test checks a false failure has probability < 4e-5 (and the
draws are fixed by the seed, so a pass is a pass every time). A biased estimator fails: top-k's is
shown off by far more than this in each test."""


def row(vocab: int = 30, seed: int = 0) -> torch.Tensor:
    """A next-token-like distribution: a few likely tokens and a long tail of unequal ones."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(vocab, generator=g)
    z[:3] += torch.tensor([4.0, 3.0, 2.0])
    return z


def top_k_implied(z: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """The distribution a top-k target stands for: its k probabilities, its tail spread evenly."""
    t = top_k_targets(z.view(1, -1), k, temperature, torch.float32)
    vocab = z.numel()
    p = torch.full((vocab,), t["tail_logp"].exp().item() / (vocab - k))
    return p.scatter(0, t["topk_ids"][0].long(), t["topk_logp"][0].exp())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_targets_expectation_is_the_whole_distribution(temperature):
    """E[p̂] = p: the mean of 4,000 rows' empirical distributions of n = 12 draws each (the draws
    of top-8 fp16's bytes) against p, within Z_BOUND standard errors sqrt(p(1−p)/(n·rows)) of a
    Binomial count — on the path a run takes (the generator keyed by the logits)."""
    z, rows, n = row(), 4000, sampled_draws(8, torch.float16)
    target = sampled_targets(z.expand(rows, -1).contiguous(), n, temperature)
    assert target["sampled_ids"].shape == (rows, n) and target["sampled_ids"].dtype == torch.int32
    p = soft_targets(z, temperature).double()
    mean = empirical_distribution(target["sampled_ids"], z.numel()).double().mean(0)
    se = (p * (1 - p) / (n * rows)).sqrt()
    assert ((mean - p).abs() <= Z_BOUND * se + 1e-12).all(), ((mean - p) / se).abs().max()
    assert mean.sum().item() == pytest.approx(1.0, abs=1e-6)  # each row sums to one (in fp32)
    # The test has power: top-k's distribution (tail spread evenly) is off by far more.
    biased = top_k_implied(z, 8, temperature).double()
    assert ((biased - p).abs() / se).max() > 2 * Z_BOUND


def test_sampled_targets_are_drawn_the_same_from_the_same_logits_and_differently_from_others():
    """Keyed by the logits' bits: every runner and a resumed run draw alike; another row does not."""
    z = torch.randn(64, 40, generator=torch.Generator().manual_seed(3))
    state = torch.get_rng_state()
    first, again = sampled_targets(z, 12, 1.0), sampled_targets(z.clone(), 12, 1.0)
    assert torch.equal(torch.get_rng_state(), state)  # the run's own random numbers untouched
    assert torch.equal(first["sampled_ids"], again["sampled_ids"])
    other = z.clone()
    other[5, 7] += 1e-3
    assert not torch.equal(sampled_targets(other, 12, 1.0)["sampled_ids"], first["sampled_ids"])
    # Chunked drawing is the same as drawing at once.
    chunked = sampled_targets(z, 12, 1.0, chunk_elements=40 * 7)
    assert torch.equal(chunked["sampled_ids"], first["sampled_ids"])


def per_row_gradients(loss_of, student: torch.Tensor) -> torch.Tensor:
    """Each row's gradient of a row-averaged loss (the rows are independent)."""
    s = student.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(s), s)
    return grad * s.shape[0]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_kl_gradient_expectation_is_the_whole_kl_gradient(temperature):
    """The sampled KL's gradient T·(q − p̂) is linear in p̂, so its mean over draws is the whole
    KL's gradient T·(q − p): per coordinate within Z_BOUND standard errors of the mean of 4,000
    independent rows (the error estimated from the rows' own spread). Top-k's gradient is not."""
    z, rows, n = row(), 4000, 12
    student = row(seed=5).expand(rows, -1).contiguous()
    whole = per_row_gradients(lambda s: soft_kl(s, soft_targets(z.view(1, -1), temperature), temperature),
                              student[:1])[0].double()
    target = sampled_targets(z.expand(rows, -1).contiguous(), n, temperature)
    grads = per_row_gradients(lambda s: payload_kl(s, target, temperature), student).double()
    se = grads.std(0) / math.sqrt(rows)
    assert ((grads.mean(0) - whole).abs() <= Z_BOUND * se + 1e-9).all(), ((grads.mean(0) - whole) / se).abs().max()
    top = top_k_targets(z.view(1, -1), 8, temperature, torch.float32)
    biased = per_row_gradients(lambda s: payload_kl(s, top, temperature), student[:1])[0].double()
    assert ((biased - whole).abs() / se).max() > 2 * Z_BOUND


def test_sampled_kl_toward_the_mean_of_two_peers_has_the_gradient_of_the_kl_to_their_mean():
    """Codistillation's teacher is the mean of the peers' distributions: two peers' draws pooled
    (`mean_target_kl`) give, in expectation, the gradient of T²·KL(mean_j p_j ‖ q); the two peers'
    top-8 targets do not."""
    T, rows, n = 2.0, 4000, 12
    peers = [row(seed=1), row(seed=2) * 1.5]
    student = row(seed=5).expand(rows, -1).contiguous()
    mean_p = torch.stack([soft_targets(z.view(1, -1), T) for z in peers]).mean(0)
    whole = per_row_gradients(lambda s: soft_kl(s, mean_p, T), student[:1])[0].double()
    targets = [sampled_targets(z.expand(rows, -1).contiguous(), n, T) for z in peers]
    grads = per_row_gradients(lambda s: mean_target_kl(s, targets, T), student).double()
    se = grads.std(0) / math.sqrt(rows)
    assert ((grads.mean(0) - whole).abs() <= Z_BOUND * se + 1e-9).all(), ((grads.mean(0) - whole) / se).abs().max()
    tops = [top_k_targets(z.view(1, -1), 8, T, torch.float32) for z in peers]
    biased = per_row_gradients(lambda s: mean_target_kl(s, tops, T), student[:1])[0].double()
    assert ((biased - whole).abs() / se).max() > 2 * Z_BOUND
    # And pooled in chunks of rows, as a language model's positions are taken: the same value and gradient.
    chunked = per_row_gradients(lambda s: mean_target_kl(s, targets, T, chunk_elements=30 * 64), student)
    assert torch.allclose(chunked, grads.float(), rtol=1e-5, atol=1e-7)


def test_sampled_targets_take_the_bytes_of_top_k():
    z = torch.randn(100, 1024, generator=torch.Generator().manual_seed(0))
    for k, dtype in ((8, torch.float16), (64, torch.float16), (64, torch.bfloat16), (8, torch.float32)):
        top = sum(t.numel() * t.element_size() for t in top_k_targets(z, k, 1.0, dtype).values())
        sent = sampled_targets(z, sampled_draws(k, dtype), 1.0)["sampled_ids"]
        assert top - 4 * 100 < sent.numel() * sent.element_size() <= top, (k, dtype)
    assert sampled_draws(8, torch.float16) == 12 and sampled_draws(64, torch.float16) == 96


def test_sampled_targets_setting_is_checked(tmp_path, capsys):
    from codistill.cli import main

    assert load_config(f"{REPO}/{LM}", ["exchange.targets=sampled"]).exchange.targets == "sampled"
    assert main(["train", f"{REPO}/{LM}", "--set", "exchange.targets=unbiased", "--set",
                 f"ray.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: exchange.targets: got 'unbiased'"), err
    assert "'top_k'" in err[0] and "'sampled'" in err[0]
    with pytest.raises(ConfigError) as info:  # a method that uses its peers' logits as more than soft targets
        load_config(f"{REPO}/{LM}", ["method={name: kdcl}", "exchange.targets=sampled"])
    assert info.value.path == "exchange.targets" and "codistill" in info.value.message


@pytest.mark.slow  # one short LM codistillation: the full tier
def test_lm_peers_codistill_with_sampled_targets_in_the_bytes_of_top_k(tmp_path):
    from codistill.engine.run import train

    tiny = ("peers.*.model_args={width: 32, depth: 1, heads: 2, context: 32}", "data.context=32", "data.batch_size=8",
            "train.steps=40", "train.eval_every=20", "train.checkpoint_every=20",
            "method={name: codistill, burn_in: 0, period: 10}", "exchange.top_k=8")
    runs = {kind: train(small_config(tmp_path, f"name={kind}", *tiny, f"exchange.targets={kind}", base=LM), "local")
            for kind in ("top_k", "sampled")}
    sent = {kind: [r["bytes_sent"] for r in run.records.to_pylist() if r.get("bytes_sent")]
            for kind, run in runs.items()}
    assert sent["sampled"] and max(sent["sampled"]) <= min(sent["top_k"])  # 12 int32 draws ≤ top-8's 50 bytes
    kl = [r["kl"] for r in runs["sampled"].records.to_pylist() if r["split"] == "train" and r["step"] >= 10]
    assert kl and all(math.isfinite(v) and v > 0 for v in kl)
    assert all(b < math.log2(1024) for b in runs["sampled"].final["peer_bits"])  # below uniform over the vocabulary
