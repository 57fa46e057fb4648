"""`codistill bench noise-scale`: the two-batch estimator of B_simple = tr(Σ)/|G|² (McCandlish et al.
2018, Appendix A) against problems whose true gradient and covariance are known, and the command."""

import json
import os

import pytest
import torch

from codistill.bench.noise_scale import measure, model_gradient, ratio_of_means, two_batch_estimates
from codistill.cli import main
from codistill.data import ArrayDataset
from tests.conftest import REPO

# A statistical tolerance: the estimate is a ratio of means over the repetitions, whose spread at
# these repeats is a few per cent; 15% holds for the seed whatever the CPU's float kernels.
TOLERANCE = 0.15


def test_the_estimators_are_exact_on_expected_squared_norms():
    """E|G_b|² = |G|² + tr(Σ)/b: fed the expectations, the estimators give |G|² and tr(Σ) exactly."""
    g2, trace = torch.tensor([2.0]), torch.tensor([300.0])
    got = two_batch_estimates(g2 + trace / 10, g2 + trace / 250, 10, 250)
    assert torch.allclose(got[0], g2) and torch.allclose(got[1], trace)


def test_b_simple_of_a_quadratic_with_gaussian_examples_is_its_known_value():
    """Loss ½|w − x|² with x ~ N(m, Σ): the gradient of a batch is w − mean(x), so G = w − m and
    B_simple = tr(Σ)/|w − m|² = 60 here."""
    d = 20
    scales = torch.linspace(0.5, 2.0, d)  # an anisotropic Σ = diag(scales²)
    trace = float(scales.square().sum())
    signal = torch.ones(d) * (trace / 60 / d) ** 0.5  # w − m with |w − m|² = tr(Σ)/60

    def batch_gradient(size, generator):
        x = torch.randn(size, d, generator=generator, dtype=torch.float64) * scales
        return signal - x.mean(0)

    got = measure(batch_gradient, small=8, big=256, repeats=800, seed=0)
    assert got["b_simple"] == pytest.approx(60, rel=TOLERANCE)
    assert got["low"] < 60 < got["high"]
    assert got["trace"] == pytest.approx(trace, rel=TOLERANCE)


def test_b_simple_of_a_classifier_on_a_finite_training_set_is_the_exact_one():
    """A softmax regression on 200 examples, a few full-batch steps in (B_simple ≈ 94, about half
    the training set): its per-example gradients, computed one by one, give the exact G and Σ over
    the training set. Drawn without replacement, E|G_b|² would lose tr(Σ)/(N − 1) at every b, the
    estimate of |G|² with it, and B_simple would come out near twice the truth."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(200, 5, generator=generator)
    y = (x[:, 0] + 0.8 * torch.randn(200, generator=generator) > 0).long() + (x[:, 1] > 0.5).long()
    data = ArrayDataset(x, y, x[:10], y[:10], num_classes=3, input_kind="sequence")
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(8):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    per_example = []
    for i in range(200):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        per_example.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    grads = torch.stack(per_example)
    mean = grads.mean(0)
    truth = float((grads - mean).square().sum(1).mean() / mean.square().sum())
    assert 60 < truth < 130  # the regime where drawing without replacement would be far off
    got = measure(model_gradient(model, data, chunk=50), small=8, big=133, repeats=600, seed=0)
    assert got["b_simple"] == pytest.approx(truth, rel=TOLERANCE)


def test_an_estimate_of_no_signal_has_an_open_upper_end():
    got = ratio_of_means(torch.tensor([-1.0, 0.5, -0.2, 0.1], dtype=torch.float64),
                         torch.tensor([10.0, 12.0, 9.0, 11.0], dtype=torch.float64))
    assert got["high"] == float("inf") and got["b_simple"] == float("inf")


def _tiny(tmp_path, *more):
    return ["bench", "noise-scale", os.path.join(REPO, "configs", "dp_vs_codistill_mnist1d.yaml"), "--set", "train.steps=20",
            "--set", "data.test_examples=0", "--set", f"ray.storage_path={tmp_path}", "--steps", "0,10",
            "--small", "10", "--big", "50", "--repeats", "4", *more]


def test_the_command_prints_the_table_writes_the_plot_and_reuses_its_checkpoints(tmp_path, capsys):
    assert main(_tiny(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "training peer mnist1d_cnn alone from step 0 to 10" in out
    assert "| step | B_simple (examples) | 95% interval |" in out
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| 10 |")]
    folder = tmp_path / "dp_vs_codistill_mnist1d.noise_scale"
    assert (folder / "noise_scale.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((folder / "noise_scale.json").read_text())["rows"]
    assert [r["step"] for r in rows] == [0, 10] and all(r["trace"] > 0 for r in rows)
    # Measured again, with one step more: the checkpoints kept are measured, training goes on from 10.
    assert main(_tiny(tmp_path, "--steps", "0,10,15")) == 0
    again = capsys.readouterr().out
    assert "from step 10 to 15" in again
    assert json.loads((folder / "noise_scale.json").read_text())["rows"][:2] == rows
    # The folder is a run of one peer: measured from its checkpoints, nothing trains.
    assert main(["bench", "noise-scale", str(folder), "--small", "10", "--big", "50", "--repeats", "4"]) == 0
    assert "training peer" not in capsys.readouterr().out


@pytest.mark.parametrize("bad, says", [
    (["--big", "10"], "--big: must be larger than --small"),
    (["--steps", "0,50"], "--steps: are steps in 0..20"),
    (["--steps", "a,b"], "--steps: is a comma-separated list"),
    (["--repeats", "1"], "--repeats: is the number of repetitions"),
    (["--peer", "2"], "--peer: is a peer of the config, 0..1"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys, bad, says):
    assert main(_tiny(tmp_path, *bad)) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1


def test_a_run_folder_measures_only_the_steps_it_has(tmp_path, capsys):
    assert main(_tiny(tmp_path)) == 0
    capsys.readouterr()
    folder = tmp_path / "dp_vs_codistill_mnist1d.noise_scale"
    assert main(["bench", "noise-scale", str(folder), "--steps", "0,5"]) == 2
    assert "--steps: [5] have no checkpoint" in capsys.readouterr().err


class _TokenModel(torch.nn.Module):
    """Logits [windows × positions, vocab], as a language-model peer returns them."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(vocab, 6), torch.nn.Linear(6, vocab)

    def forward(self, x):
        return self.head(self.embed(x)).reshape(-1, self.head.out_features)


def test_a_language_models_gradient_is_per_token_leaving_out_ignored_positions_whatever_the_chunks():
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(11, (30, 8), generator=generator)
    y = torch.randint(11, (30, 8), generator=generator)
    y[::4, 5:] = -100  # padded tails
    data = ArrayDataset(x, y, x[:2], y[:2], num_classes=11, input_kind="tokens")
    torch.manual_seed(0)
    model = _TokenModel(11)
    whole = model_gradient(model, data, chunk=1000)(64, torch.Generator().manual_seed(5))
    chunked = model_gradient(model, data, chunk=3)(64, torch.Generator().manual_seed(5))  # 8 windows: 64 tokens
    windows = torch.randint(30, (8,), generator=torch.Generator().manual_seed(5))
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x[windows]), y[windows].reshape(-1), ignore_index=-100).backward()
    direct = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(whole, direct, atol=1e-6) and torch.allclose(chunked, direct, atol=1e-6)


def test_token_batch_sizes_must_be_whole_windows():
    from argparse import Namespace

    from codistill.bench.noise_scale import _sizes
    from codistill.errors import ConfigError

    cfg = Namespace(data=Namespace(batch_size=4))
    assert _sizes(Namespace(small=None, big=None), cfg, 128, "tokens") == (512, 5120)
    with pytest.raises(ConfigError, match="--big: is in tokens, a multiple of the 128 positions"):
        _sizes(Namespace(small=256, big=1000), cfg, 128, "tokens")


def test_checkpoints_of_another_config_are_not_measured_as_this_ones(tmp_path, capsys):
    assert main(_tiny(tmp_path)) == 0
    capsys.readouterr()
    assert main(_tiny(tmp_path, "--set", "peers.0.optimizer.lr=0.02")) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of another config (peers.0.optimizer.lr: 0.01 there, 0.02 now)" in err
    assert main(["bench", "kl", "configs/dml_mnist1d.yaml"]) == 2  # only noise-scale takes a CONFIG|RUN
    assert "kl takes no CONFIG|RUN argument" in capsys.readouterr().err
