import pytest
import torch

from codistill.models import MODELS, PeerModel, create_model

INPUTS = {"sequence": (1, 40), "image": (3, 32, 32)}
CLASSIFIERS = sorted(n for n in MODELS if MODELS[n].input_kind in INPUTS)  # language models: tests/test_lm.py


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_registered_model_classifies_its_input(name):
    model = create_model(name, num_classes=7)
    assert isinstance(model, PeerModel)
    x = torch.randn(2, *INPUTS[MODELS[name].input_kind])
    model.eval()
    logits = model(x)
    assert logits.shape == (2, 7)
    assert model.features(x).shape == (2, model.feature_dim)


@pytest.mark.parametrize("depth,params", [(20, 0.27e6), (32, 0.46e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnets_have_the_published_sizes(depth, params):
    # He et al. 2016, Table 6: 0.27M, 0.46M, 0.85M, 1.7M parameters (10 classes).
    count = sum(p.numel() for p in create_model(f"resnet{depth}", 10).parameters())
    assert count == pytest.approx(params, rel=0.06)


def test_unknown_model_lists_the_registry():
    from codistill.errors import ConfigError

    with pytest.raises(ConfigError, match="mnist1d_cnn"):
        create_model("lenet", 10)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_declared_feature_tap_is_caught_in_one_forward_pass(name):
    from codistill.models.taps import capture_taps

    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, *INPUTS[MODELS[name].input_kind])
    with capture_taps(model, MODELS[name].taps) as taps:
        logits = model(x)
    assert set(taps) == set(MODELS[name].taps) and logits.shape == (2, 7)
    assert all(t.shape[0] == 2 for t in taps.values())
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())  # hooks removed


def test_registering_a_name_twice_is_refused():
    from codistill.models import register_model

    with pytest.raises(ValueError, match="registered twice"):
        register_model("mnist1d_cnn", input_kind="sequence")(lambda num_classes: None)
