"""The launch files in cluster/: valid for the Ray they name, and consistent with each other.

The cluster-launcher YAMLs go through the same `prepare_config` + schema validation that
`ray up` applies before it contacts a cloud; the KubeRay manifests are checked for the fields
the RayCluster / RayJob CRDs require, and the command the RayJob runs is parsed by codistill's
own CLI and config loader, so a renamed config key breaks this test rather than a GPU job."""

from __future__ import annotations

import copy
import os
import re
import shlex

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from codistill.cli import build_parser
from codistill.config import load_config
from tests.conftest import REPO

CLUSTER = os.path.join(REPO, "cluster")
IMAGE_PATTERN = re.compile(r"^rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu$")


def load(name: str) -> dict:
    with open(os.path.join(CLUSTER, name)) as f:
        return yaml.safe_load(f)


def dockerfile_image() -> str:
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        return next(line.split()[1] for line in f if line.startswith("FROM "))


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_yaml_passes_ray_up_validation(name):
    config = load(name)
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on anything `ray up` rejects
    assert config["docker"]["image"] == dockerfile_image()
    assert IMAGE_PATTERN.match(config["docker"]["image"])
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "peers must not land on the GPU-less head"
    workers = [spec for key, spec in nodes.items() if key != config["head_node_type"]]
    assert workers and all(spec["min_workers"] >= 2 for spec in workers), "a 2-peer run needs 2 GPU nodes at start"
    node_config = workers[0]["node_config"]
    has_gpu = node_config.get("InstanceType", "").startswith(("g", "p")) or node_config.get("guestAccelerators")
    assert has_gpu, "worker nodes must have GPUs"
    # The project and the token reach every node; every node runs with token authentication.
    assert config["file_mounts"]["/home/ray/codistill"] == "."
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]
    assert any("pip install" in cmd and "/home/ray/codistill" in cmd for cmd in config["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in cmd for cmd in config[key])


def test_launcher_validation_rejects_a_misspelled_key():
    """The check above could fail: Ray's schema refuses a typo in a node type."""
    config = load("aws.yaml")
    config["available_node_types"]["gpu_worker"]["min_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(config))


def check_ray_cluster_spec(spec: dict, image: str) -> None:
    """Fields the RayCluster CRD (ray.io/v1) requires, and what codistill relies on."""
    assert spec["rayVersion"] == IMAGE_PATTERN.match(image).group(1)
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams are strings"
    assert head["rayStartParams"]["num-cpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        assert container["name"] and container["image"]
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["template"]["spec"]["containers"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            assert container["image"]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_raycluster_manifest():
    manifest = load("raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    check_ray_cluster_spec(manifest["spec"], dockerfile_image())


def test_rayjob_manifest_runs_a_valid_codistill_command():
    manifest = load("rayjob.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    check_ray_cluster_spec(spec["rayClusterSpec"], dockerfile_image())
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["codistill", "train"]
    args = build_parser().parse_args(argv[1:])
    # The config sits inside the image at the Dockerfile's WORKDIR; here, in the checkout.
    config_path = os.path.join(REPO, os.path.relpath(args.config, "/home/ray/codistill"))
    cfg = load_config(config_path, args.set or [])
    assert cfg.ray.storage_path.startswith("s3://"), "a multi-node job needs shared storage"


def test_dockerfile_installs_the_project_with_its_configs():
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        text = f.read()
    assert IMAGE_PATTERN.match(dockerfile_image())
    assert "WORKDIR /home/ray/codistill" in text
    assert re.search(r"^COPY .*configs", text, re.M) and re.search(r"^RUN pip install .*-e \.", text, re.M)
