"""`train.precision` as one object (`engine/precision.py`): the forward pass's dtype, backward and
the optimizer step, and the state a checkpoint keeps of them — under the key files written before
this object already used, so those keep loading."""

import pytest
import torch

from codistill.engine.precision import Precision

CPU = torch.device("cpu")


def one_step(precision: Precision) -> torch.nn.Linear:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with precision.forward():
        loss = model(torch.ones(3, 4)).float().pow(2).mean()
    precision.backward(loss)
    precision.optimizer_step(optimizer)
    return model


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_forward_pass_runs_in_the_precisions_dtype_and_keeps_no_state(name, dtype):
    precision = Precision(name, CPU)
    with precision.forward():
        assert torch.nn.Linear(4, 2)(torch.ones(1, 4)).dtype == dtype
    assert precision.state_dict() == {}
    precision.load_state_dict({"grad_scaler": {"scale": 8.0}})  # another run's scale: nothing to put it in


def test_fp16_scales_the_loss_steps_as_plain_sgd_would_and_keeps_its_scale_in_a_checkpoint():
    fp16 = Precision("fp16", CPU)
    stepped, plain = one_step(fp16), one_step(Precision("fp32", CPU))
    torch.testing.assert_close(stepped.weight, plain.weight, rtol=1e-2, atol=1e-3)  # the scale is undone
    saved = fp16.state_dict()
    assert list(saved) == ["grad_scaler"] and saved["grad_scaler"]["scale"] > 0
    resumed = Precision("fp16", CPU)
    resumed.load_state_dict({"model": {}, "grad_scaler": {**saved["grad_scaler"], "scale": 1024.0}})
    assert resumed.state_dict()["grad_scaler"]["scale"] == 1024.0
    fresh = Precision("fp16", CPU)
    fresh.load_state_dict({"model": {}})  # a file of a run that was not fp16 before: the scale starts afresh
    assert fresh.state_dict()["grad_scaler"]["scale"] == Precision("fp16", CPU).state_dict()["grad_scaler"]["scale"]
