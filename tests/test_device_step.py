"""The step a GPU user pays for, tested on the CPU: the device data path gives the same batches, bf16 trains as well as fp32 (its
payloads half the bytes, its soft targets still fp32), fp16's grad scaler is checkpointed,
and `train.compile` trains. What needs CUDA itself is in `test_gpu.py` (`pytest -m gpu`)."""

import threading

import pytest
import torch

from codistill.config import ConfigError
from codistill.data import load_dataset
from codistill.engine.job import make_job, peer_schedules
from codistill.engine.loop import train_step
from codistill.engine.run import train
from codistill.exchange import LocalGatherHub
from codistill.methods.losses import soft_kl, soft_targets
from tests.conftest import small_config


def one_step(cfg, step: int = 5, device: str = "cpu") -> list[dict]:
    """Every peer's gradients (by parameter name) and record after one `train_step`, the K
    peers as threads, as the local runner runs them."""
    data = load_dataset(cfg.data.name, augment=cfg.data.augment)
    hub = LocalGatherHub(cfg.num_peers)
    schedules = peer_schedules(cfg, len(data.y_train))
    jobs = [make_job(cfg, k, data, schedules, torch.device(device), hub.exchange_for(k)) for k in range(cfg.num_peers)]
    out: dict[int, dict] = {}

    def run(k: int) -> None:
        record = train_step(jobs[k], step)
        out[k] = {"record": record, "job": jobs[k],
                  "grads": {n: p.grad.clone() for n, p in jobs[k].peer.network.named_parameters() if p.grad is not None}}

    threads = [threading.Thread(target=run, args=(k,)) for k in range(cfg.num_peers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [out[k] for k in range(cfg.num_peers)]


def test_the_removed_overlap_setting_is_refused_naming_the_key(tmp_path):
    # `train.overlap` was always slower (a second backward pass, docs/gpu.md): a config that
    # still sets it is told so instead of silently training without it.
    with pytest.raises(ConfigError, match=r"train: unknown key 'overlap'|train\.overlap"):
        small_config(tmp_path, "train.overlap=true")


def test_the_device_data_path_gives_the_cpu_paths_batches():
    """On this machine the device is the CPU: what is tested is that batches cut from a data set
    moved with `.to()` — indices and augmentation numbers moved to it — equal the default path's."""
    data = load_dataset("synthetic_images", augment=True)
    moved = data.to(torch.device("cpu"))
    assert moved is not data and moved.x_train.device.type == "cpu"
    indices = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    for seed in range(3):
        a = data.train_batch(indices, torch.Generator().manual_seed(seed))
        b = moved.train_batch(indices, torch.Generator().manual_seed(seed))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_a_run_with_data_on_the_device_equals_the_default_run(tmp_path):
    default = train(small_config(tmp_path, "name=cpu_data"), "local")
    on_device = train(small_config(tmp_path, "name=device_data", "train.data_on_device=true"), "local")
    losses = [[r["loss"] for r in t.records.to_pylist() if r["split"] == "train"] for t in (default, on_device)]
    assert losses[0] == losses[1]
    assert default.final["peer_accuracy"] == on_device.final["peer_accuracy"]


def test_bf16_payloads_are_bf16_and_soft_targets_fp32(tmp_path):
    (peer, _) = one_step(small_config(tmp_path, "train.precision=bf16"))
    job = peer["job"]
    with job.precision.forward():
        outputs = job.peer.network(load_dataset("mnist1d").x_test[:8])
        payload = job.method.payload(outputs, {})
        assert payload["logits"].dtype == torch.bfloat16  # half the bytes of fp32 on the wire
        assert soft_targets(payload["logits"], 3.0).dtype == torch.float32
        assert soft_kl(outputs, soft_targets(payload["logits"], 3.0), 3.0).dtype == torch.float32


@pytest.mark.slow  # a CPU without bf16 kernels emulates it: over a minute there
def test_bf16_trains_mnist1d_dml_within_a_point_of_fp32(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = small_config(tmp_path, f"name=dml_{precision}", f"train.precision={precision}", "train.steps=1500",
                           "train.eval_every=500", "train.checkpoint_every=0")
        runs[precision] = train(cfg, "local").final
    fp32, bf16 = (sum(runs[p]["peer_accuracy"]) / 2 for p in ("fp32", "bf16"))
    assert fp32 > 0.85
    assert abs(bf16 - fp32) <= 0.01, (fp32, bf16)


@pytest.mark.slow  # > 1.5 s: the full tier
def test_fp16_keeps_its_grad_scaler_in_the_checkpoint_and_resumes_it(tmp_path):
    from codistill.engine.checkpoint import checkpoint_folders, from_bytes, peer_file
    from codistill.storage import open_run_storage

    overrides = ("name=fp16", "train.precision=fp16", "peers.*.optimizer.schedule=constant")
    first = train(small_config(tmp_path, *overrides, "train.steps=40"), "local")
    storage = open_run_storage(str(tmp_path), "fp16")
    step, folder = checkpoint_folders(storage)[-1]
    state = from_bytes(storage.read_bytes(f"{folder}/{peer_file(0)}"))
    assert step == 40 and state["grad_scaler"]["scale"] > 0
    resumed = train(small_config(tmp_path, *overrides, "train.steps=80"), "local")
    assert first.final["step"] == 40 and resumed.final["step"] == 80
    steps = [r["step"] for r in resumed.records.to_pylist() if r["split"] == "train" and r["peer"] == 0]
    assert steps == list(range(1, 81))  # resumed at 41, nothing repeated or lost


@pytest.mark.slow  # inductor compiles C++ on a CPU: ~20 s
def test_compile_trains_a_small_model_as_the_plain_network_does(tmp_path):
    overrides = ("peers.*.model=mnist1d_mlp", "method=independent", "train.steps=40", "train.eval_every=40")
    plain = train(small_config(tmp_path, "name=plain", *overrides), "local")
    compiled = train(small_config(tmp_path, "name=compiled", "train.compile=true", *overrides), "local")
    a, b = ([r["loss"] for r in t.records.to_pylist() if r["split"] == "train"] for t in (plain, compiled))
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_compile_with_feature_taps_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.compile"):
        small_config(tmp_path, "train.compile=true", "method={name: dml, also: [{name: at, source: peers, taps: [conv2]}]}")
