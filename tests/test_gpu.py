"""What only a CUDA device can show: the same DML step on the GPU as on the CPU, and bf16 there.
Marked `gpu`: skipped where there is no CUDA (here, and CI), run on a GPU machine with
`pytest -m gpu`."""

import pytest
import torch

from tests.conftest import small_config
from tests.test_device_step import one_step

pytestmark = pytest.mark.gpu


def test_a_dml_step_on_the_gpu_gives_the_cpus_losses_and_gradients(tmp_path):
    cfg = small_config(tmp_path)
    on_cpu, on_gpu = one_step(cfg), one_step(cfg, device="cuda")
    for cpu, gpu in zip(on_cpu, on_gpu):
        assert gpu["record"]["loss"] == pytest.approx(cpu["record"]["loss"], rel=1e-4)
        assert next(iter(gpu["grads"].values())).device.type == "cuda"
        for name, grad in cpu["grads"].items():
            torch.testing.assert_close(gpu["grads"][name].cpu(), grad, rtol=1e-3, atol=1e-5)


def test_bf16_on_the_gpu_sends_bf16_payloads_and_keeps_finite_fp32_gradients(tmp_path):
    (peer, _) = one_step(small_config(tmp_path, "train.precision=bf16", "train.data_on_device=true"), device="cuda")
    assert all(g.dtype == torch.float32 and g.isfinite().all() for g in peer["grads"].values())
    job = peer["job"]
    with job.precision.forward():
        outputs = job.peer.network(torch.randn(8, 1, 40, device="cuda"))
    assert outputs.dtype == torch.bfloat16
