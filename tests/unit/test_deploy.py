"""The deployment files agree with the code and configs they package: KubeRay manifest, Dockerfile, dashboard."""

from __future__ import annotations

import importlib.util
import json
import re

import jsonschema
import pytest
import yaml
from harness import REPO
from packaging.requirements import Requirement

from serve_app import __version__

MANIFEST = REPO / "deploy" / "kuberay" / "rayservice.yaml"
SERVE_CONFIG = REPO / "serve_config.yaml"
DOCKERFILE = REPO / "Dockerfile"

# The parts of the RayService CRD (ray.io/v1) this manifest relies on: required keys and types as the
# CRD declares them, and no keys it does not know (the API server would silently prune a misspelt one).
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "required": ["name", "image"]},
                }
            },
        }
    },
}
_RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
RAYSERVICE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["serveConfigV2", "rayClusterConfig"],
            "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string"},
                "serveService": {"type": "object"},
                "upgradeStrategy": {"type": "object"},
                "rayClusterConfig": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                                "idleTimeoutSeconds": {"type": "integer"},
                                "resources": {"type": "object"},
                                "image": {"type": "string"},
                                "imagePullPolicy": {"type": "string"},
                                "env": {"type": "array"},
                            },
                        },
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "additionalProperties": False,
                            "properties": {
                                "rayStartParams": _RAY_START_PARAMS,
                                "template": _POD_TEMPLATE,
                                "serviceType": {"type": "string"},
                                "headService": {"type": "object"},
                                "enableIngress": {"type": "boolean"},
                            },
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"],
                                "additionalProperties": False,
                                "properties": {
                                    "groupName": {"type": "string"},
                                    "replicas": {"type": "integer"},
                                    "minReplicas": {"type": "integer"},
                                    "maxReplicas": {"type": "integer"},
                                    "rayStartParams": _RAY_START_PARAMS,
                                    "template": _POD_TEMPLATE,
                                    "scaleStrategy": {"type": "object"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def generator_deployment() -> dict:
    app = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]
    return next(d for d in app["deployments"] if d["name"] == "ImageGenerator")


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(.*)$", DOCKERFILE.read_text(), re.MULTILINE))


def containers(manifest: dict) -> list[dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


# -- KubeRay ---------------------------------------------------------------------


def test_manifest_has_the_rayservice_crd_structure(manifest):
    jsonschema.validate(manifest, RAYSERVICE_SCHEMA)


def test_schema_catches_a_misspelt_key(manifest):
    broken = yaml.safe_load(MANIFEST.read_text())
    broken["spec"]["serveConfigv2"] = broken["spec"].pop("serveConfigV2")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, RAYSERVICE_SCHEMA)


def test_embedded_serve_config_is_serve_config_yaml(manifest):
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == yaml.safe_load(SERVE_CONFIG.read_text())


def test_regenerating_the_manifest_gives_the_committed_file():
    spec = importlib.util.spec_from_file_location("sync_serve_config", REPO / "deploy/kuberay/sync_serve_config.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    committed = MANIFEST.read_text()
    assert sync.render(committed, SERVE_CONFIG.read_text()) == committed, "run make kuberay-manifest"
    # And it follows serve_config.yaml when that changes.
    changed = SERVE_CONFIG.read_text().replace("max_replicas: 8", "max_replicas: 3")
    regenerated = yaml.safe_load(sync.render(committed, changed))
    assert yaml.safe_load(regenerated["spec"]["serveConfigV2"]) == yaml.safe_load(changed)
    assert regenerated["spec"]["rayClusterConfig"] == yaml.safe_load(committed)["spec"]["rayClusterConfig"]


def test_gpu_workers_autoscale_with_room_for_every_generator_replica(manifest, generator_deployment):
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    [gpu_group] = cluster["workerGroupSpecs"]
    [worker] = gpu_group["template"]["spec"]["containers"]
    gpus_per_pod = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    per_replica = generator_deployment["ray_actor_options"]
    autoscaling = generator_deployment["autoscaling_config"]

    assert gpus_per_pod >= per_replica["num_gpus"]
    assert int(worker["resources"]["requests"]["cpu"]) >= per_replica["num_cpus"]
    replicas_per_pod = gpus_per_pod // per_replica["num_gpus"]
    assert gpu_group["maxReplicas"] * replicas_per_pod >= autoscaling["max_replicas"]
    tolerations = gpu_group["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_every_container_has_resources_and_readiness_through_serve(manifest):
    for container in containers(manifest):
        resources = container["resources"]
        assert resources["requests"] and resources["limits"], container["name"]
        probe = container["readinessProbe"]["httpGet"]
        assert (probe["path"], probe["port"]) == ("/-/healthz", 8000), "ready = this node's Serve proxy answers"
        assert {"name": "serve", "containerPort": 8000} in container["ports"]
        assert {"name": "metrics", "containerPort": 8080} in container["ports"]


def test_pods_run_the_image_this_repository_builds(manifest):
    images = {container["image"] for container in containers(manifest)}
    assert images == {f"ray-sd-serve:{__version__}"}
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == dockerfile_args()["RAY_VERSION"]


# -- Dockerfile ------------------------------------------------------------------


def test_dockerfile_pins_the_makefiles_torch_and_a_ray_the_project_accepts():
    args = dockerfile_args()
    makefile_torch = re.search(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)[1]
    assert args["TORCH_VERSION"] == makefile_torch
    pyproject = (REPO / "pyproject.toml").read_text()
    ray_requirement = Requirement(re.search(r'"(ray\[serve\][^"]*)"', pyproject)[1])
    assert ray_requirement.specifier.contains(args["RAY_VERSION"])
    assert args["EXTRAS"] == "gpu"


def test_dockerfile_installs_torch_first_then_the_project_on_a_cuda_runtime_base():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG CUDA_BASE=nvidia/cuda:[\w.-]+-runtime-", text, re.MULTILINE)
    installs = re.findall(r"^RUN pip install (.*)$", text, re.MULTILINE)
    assert installs[0] == '"torch==${TORCH_VERSION}"'
    assert '"torch==${TORCH_VERSION}"' in installs[1] and '".${EXTRAS:+[$EXTRAS]}"' in installs[1]
    assert "DiffusionPipeline.download('$PRELOAD_MODEL'" in text  # weights cached at build time on request


def test_dockerfile_serves_the_production_config_on_its_port():
    text = DOCKERFILE.read_text()
    port = yaml.safe_load(SERVE_CONFIG.read_text())["http_options"]["port"]
    assert re.search(rf"^EXPOSE .*\b{port}\b", text, re.MULTILINE)
    assert 'CMD ["serve", "run", "serve_config.yaml"]' in text


def test_docker_context_has_what_the_dockerfile_copies_and_not_the_virtualenv():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git"} <= ignored
    for sources in re.findall(r"^COPY (.+) \S+$", DOCKERFILE.read_text(), re.MULTILINE):
        for source in sources.split():
            assert (REPO / source).exists(), source
            assert source not in ignored, f"{source} is copied but excluded from the build context"


# -- Grafana ---------------------------------------------------------------------


def test_grafana_dashboard_is_importable_json_with_a_prometheus_datasource():
    dashboard = json.loads((REPO / "deploy" / "grafana" / "stable-diffusion.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(target["expr"] for target in panel["targets"])
