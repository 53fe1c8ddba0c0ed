"""The deployment files agree with the code and configs they package: KubeRay manifest, Dockerfile, dashboard.

No docker build or Kubernetes API runs here, so these check what one file promises another."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from harness import REPO
from packaging.requirements import Requirement

from serve_app import __version__

MANIFEST = REPO / "deploy" / "kuberay" / "rayservice.yaml"
SERVE_CONFIG = REPO / "serve_config.yaml"
DOCKERFILE = REPO / "Dockerfile"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def generator_deployment() -> dict:
    app = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]
    return next(d for d in app["deployments"] if d["name"] == "ImageGenerator")


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(.*)$", DOCKERFILE.read_text(), re.MULTILINE))


def dockerfile_exposed_ports() -> set[int]:
    return {
        int(port)
        for line in re.findall(r"^EXPOSE (.+)$", DOCKERFILE.read_text(), re.MULTILINE)
        for port in line.split()
    }


def containers(manifest: dict) -> list[dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


# -- KubeRay ---------------------------------------------------------------------


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


def test_every_container_has_resources_and_is_ready_when_its_serve_proxy_answers(manifest):
    serve_port = yaml.safe_load(SERVE_CONFIG.read_text())["http_options"]["port"]
    exposed = dockerfile_exposed_ports()
    for container in containers(manifest):
        resources = container["resources"]
        assert resources["requests"] and resources["limits"], container["name"]
        probe = container["readinessProbe"]["httpGet"]
        # Ready = this node's Serve proxy answers, on the port serve_config.yaml gives it.
        assert (probe["path"], probe["port"]) == ("/-/healthz", serve_port), container["name"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports["serve"] == serve_port
        # Ray's Prometheus endpoint (KubeRay starts Ray with --metrics-export-port=8080), which the image exposes.
        assert ports["metrics"] == 8080 and {serve_port, 8080} <= exposed


def test_pods_run_the_image_this_repository_builds(manifest):
    images = {container["image"] for container in containers(manifest)}
    assert images == {f"ray-sd-serve:{__version__}"}
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == dockerfile_args()["RAY_VERSION"]


# -- Dockerfile ------------------------------------------------------------------


def test_dockerfile_pins_the_makefiles_torch_and_a_ray_and_extras_the_project_has():
    args = dockerfile_args()
    makefile_torch = re.search(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)[1]
    assert args["TORCH_VERSION"] == makefile_torch
    pyproject = (REPO / "pyproject.toml").read_text()
    ray_requirement = Requirement(re.search(r'"(ray\[[^\]]*serve[^"]*)"', pyproject)[1])
    assert ray_requirement.specifier.contains(args["RAY_VERSION"])
    extras = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    for extra in args["EXTRAS"].split(","):
        assert re.search(rf"^{extra} = \[", extras, re.MULTILINE), f"no extra named {extra!r}"


def test_every_pip_install_of_the_project_keeps_the_pinned_torch():
    """Installed without the pin, the project's dependencies may resolve another torch build."""
    installs = re.findall(r"^RUN pip install (.*)$", DOCKERFILE.read_text(), re.MULTILINE)
    of_the_project = [line for line in installs if '"."' in line or '".${EXTRAS' in line]
    assert of_the_project, installs
    assert all('"torch==${TORCH_VERSION}"' in line for line in of_the_project)


def test_the_image_runs_a_config_it_contains_on_a_port_it_exposes():
    text = DOCKERFILE.read_text()
    command = json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE)[1])
    assert command[:2] == ["serve", "run"]
    config = command[2]
    copied = {source for sources in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE) for source in sources.split()}
    assert config in copied or Path(config).parent.as_posix() in copied, f"{config} is not copied into the image"
    port = yaml.safe_load((REPO / config).read_text())["http_options"]["port"]
    assert port in dockerfile_exposed_ports()


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
