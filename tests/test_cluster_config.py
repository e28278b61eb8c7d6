"""The cluster configs boot as written: infra/ray/cluster.yaml against Ray's own cluster-launcher schema and
preparation (what `ray up` runs before it calls AWS), the KubeRay manifests against the RayCluster and RayJob
CRD schemas (vendored in tests/data/kuberay/, unknown fields refused as `kubectl --validate=strict` does), and
the images, node shapes and mounts the deployment needs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from poison_core import __version__

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "infra" / "ray" / "cluster.yaml"
DOCKERFILE = ROOT / "infra" / "ray" / "Dockerfile"
KUBERAY = ROOT / "infra" / "kuberay"
SCHEMAS = Path(__file__).parent / "data" / "kuberay"
CPU_IMAGE, GPU_IMAGE = f"belladonna:{__version__}-cpu", f"belladonna:{__version__}-cu128"


def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def kuberay(kind: str) -> dict:
    docs = [d for f in sorted(KUBERAY.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return next(d for d in docs if d["kind"] == kind)


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields refused: every object schema that lists its properties (and
    keeps no unknown fields) gets ``additionalProperties: false``, as Kubernetes' strict field
    validation treats a field the schema does not know."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_validator(name: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict(json.loads((SCHEMAS / f"{name}.v1.schema.json").read_text())))


def test_launcher_config_passes_rays_schema_and_preparation():
    prepared = prepare_config(launcher())
    validate_config(prepared)
    assert prepared["head_node_type"] == "head" and prepared["available_node_types"]["head"]["max_workers"] == 0
    broken = {**launcher(), "available_node_types": {**launcher()["available_node_types"],
                                                     "head": {"resources": {"CPU": 0}, "node_config": {},
                                                              "image": "x"}}}
    with pytest.raises(jsonschema.ValidationError, match="image"):
        validate_config(prepare_config(broken))


def test_nodes_run_python_311_images_of_the_installed_ray_and_install_nothing():
    config = prepare_config(launcher())  # fills Ray's defaults in: a missing key would bring its pip installs
    assert config["docker"]["image"].endswith("/" + CPU_IMAGE) and config["docker"]["container_name"]
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["docker"]["worker_image"].endswith("/" + GPU_IMAGE)
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands") for c in config[key]]
    assert not any(re.search(r"pip install|apt-get|conda install", c) for c in commands), commands
    dockerfile = DOCKERFILE.read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-cpu"
    assert f"--build-arg RAY_IMAGE=rayproject/ray:{ray.__version__}-py311-cu128" in dockerfile
    assert f"-t $REGISTRY/{CPU_IMAGE} ." in dockerfile and f"-t $REGISTRY/{GPU_IMAGE} ." in dockerfile
    assert "pip install --no-cache-dir -c constraints.txt" in dockerfile and "dataset-fashion-mnist" in dockerfile
    assert f"ray=={ray.__version__}" in (ROOT / "constraints.txt").read_text().splitlines()


def test_head_runs_no_jobs_and_gpu_workers_boot_a_driver_image():
    config = launcher()
    nodes = config["available_node_types"]
    assert nodes["head"]["resources"] == {"CPU": 0}
    assert any("--head" in c and "--num-cpus=0" in c for c in config["head_start_ray_commands"])
    assert nodes["gpu_worker"]["resources"]["GPU"] >= 1
    for node in nodes.values():
        assert "nvidia-driver-gpu" in node["node_config"]["ImageId"]  # Docker, NVIDIA driver and toolkit


def test_mounts_leave_out_run_outputs_and_git():
    config = launcher()
    assert "." in config["file_mounts"].values()
    assert {"runs", ".git"} <= set(config["rsync_exclude"])
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {"runs", ".git"} <= ignored


@pytest.mark.parametrize("kind, schema", [("RayCluster", "raycluster"), ("RayJob", "rayjob")])
def test_kuberay_manifests_pass_the_crd_schema(kind, schema):
    validator = crd_validator(schema)
    manifest = kuberay(kind)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert not errors, errors
    typo = copy.deepcopy(manifest)
    spec = typo["spec"] if kind == "RayCluster" else typo["spec"]["rayClusterSpec"]
    spec["workerGroupSpec"] = spec.pop("workerGroupSpecs")
    assert not validator.is_valid(typo)


def test_kuberay_matches_the_launcher_config():
    cluster, job, config = kuberay("RayCluster"), kuberay("RayJob"), launcher()
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].endswith("/" + CPU_IMAGE) and head["image"] == config["docker"]["image"]
    (group,) = spec["workerGroupSpecs"]
    gpu_node = config["available_node_types"]["gpu_worker"]
    worker = group["template"]["spec"]["containers"][0]
    assert worker["image"] == gpu_node["docker"]["worker_image"]
    assert int(worker["resources"]["limits"]["cpu"]) == gpu_node["resources"]["CPU"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == gpu_node["resources"]["GPU"]
    assert group["maxReplicas"] == gpu_node["max_workers"] == config["max_workers"]
    assert job["spec"]["entrypoint"].startswith("belladonna run ")
    assert "BELLADONNA_STORE" in yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
