"""Where the Ray runner puts its workers, checked before any starts: one worker per GPU, too
few GPUs refused, the placement the trainer asks Ray for, whole workers per node, and peers
(together or apart) that a fixed instance cannot place refused naming what to change."""

import pytest

from codistill.engine.run import train
from tests.conftest import scaled, small_config


@pytest.mark.parametrize("cluster, peers, replicas, expected", [
    ({"CPU": 16, "GPU": 4}, 2, 1, {"CPU": 1.0, "GPU": 1.0}),   # workstation, G ≥ K: one peer per GPU
    ({"CPU": 16, "GPU": 4}, 2, 2, {"CPU": 1.0, "GPU": 1.0}),   # 2 peers × 2 DDP replicas = 4 GPUs
    ({"CPU": 2}, 3, 1, {"CPU": 1.0}),                          # no GPU at all: one CPU per peer
])
def test_automatic_resources_put_one_worker_on_each_gpu(make_config, cluster, peers, replicas, expected):
    from codistill.engine.ray.placement import resources_per_worker

    cfg = make_config("peers=[" + ", ".join(["{model: mnist1d_cnn}"] * peers) + "]", f"ray.workers_per_peer={replicas}")
    assert cfg.num_peers == peers
    assert resources_per_worker(cfg, cluster) == expected


def test_too_few_gpus_is_an_error_not_a_silent_cpu_run(make_config):
    from codistill.config import ConfigError
    from codistill.engine.ray.placement import resources_per_worker

    with pytest.raises(ConfigError, match=r"ray\.resources_per_peer: .* 1 GPUs for 2 peers .*\{CPU: 1\}"):
        resources_per_worker(make_config(), {"CPU": 8, "GPU": 1})
    configured = make_config("ray.resources_per_peer={GPU: 1, CPU: 4}", "ray.workers_per_peer=2")
    assert resources_per_worker(configured, {"CPU": 8, "GPU": 1}) == {"GPU": 0.5, "CPU": 2.0}


def test_trainer_asks_ray_for_the_configured_placement(ray_local, make_config):
    from codistill.engine.ray.runner import ProgressMailbox, make_trainers
    from codistill.storage import RunStorage

    cfg = make_config("ray.resources_per_peer={GPU: 1, CPU: 2}", "ray.placement_strategy=PACK")
    board = ProgressMailbox.remote()
    (trainer,) = make_trainers(cfg, RunStorage(cfg.ray.storage_path, cfg.name), board)
    ray_local.kill(board)
    scaling = trainer.scaling_config
    assert scaling.num_workers == 2 and scaling.use_gpu and scaling.placement_strategy == "PACK"
    assert scaling.resources_per_worker == {"GPU": 1.0, "CPU": 2.0}


@pytest.mark.parametrize("per_worker, nodes, fits", [
    ({"CPU": 1.0}, [{"CPU": 2.0}], 2),
    ({"CPU": 1.0}, [{"CPU": 2.0}, {"CPU": 1.5}], 3),            # a worker lives on one node
    ({"CPU": 1.0, "GPU": 1.0}, [{"CPU": 8.0, "GPU": 2.0}], 2),
    ({"CPU": 0.5}, [{"CPU": 2.0}], 4),
])
def test_workers_that_fit_count_whole_workers_per_node(per_worker, nodes, fits):
    from codistill.engine.ray.placement import workers_that_fit

    assert workers_that_fit(per_worker, nodes) == fits


def test_more_peers_than_a_fixed_instance_can_place_fail_before_any_worker_starts(ray_local, tmp_path):
    import time

    from codistill.config import ConfigError

    cfg = small_config(tmp_path, "name=crowded", "peers=[{model: mnist1d_cnn}, {model: mnist1d_cnn}, "
                       "{model: mnist1d_cnn}, {model: mnist1d_cnn}]")
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        train(cfg, "ray")
    assert time.monotonic() - started < scaled(30)  # refused before any worker starts: no hang
    message = info.value.message
    assert info.value.path == "ray.resources_per_peer" and "4 peers" in message and "holds 2" in message
    assert "--backend local" in message and "fewer peers" in message


@pytest.mark.parametrize("fixed_size", [True, False])
def test_peers_apart_that_do_not_fit_at_once_are_an_error_on_a_fixed_instance_and_late_on_a_cluster(
        make_config, caplog, fixed_size):
    from codistill.config import ConfigError
    from codistill.engine.ray.placement import check_placement_per_peer

    cfg = make_config("peers.0.workers=2", base="configs/codistill_mnist1d.yaml")  # 3 workers, 1 CPU each
    nodes = [{"CPU": 2.0}]
    if fixed_size:
        with pytest.raises(ConfigError, match=r"^peers\.1\.workers: peer 1's 1 worker\(s\).*cannot grow"):
            check_placement_per_peer(cfg, {"CPU": 2.0}, nodes, fixed_size)
    else:
        check_placement_per_peer(cfg, {"CPU": 2.0}, nodes, fixed_size)
        assert "starts when there is room" in caplog.text
    check_placement_per_peer(cfg, {"CPU": 3.0}, [{"CPU": 2.0}, {"CPU": 1.0}], True)  # room on two nodes: fine
