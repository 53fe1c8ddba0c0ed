from pathlib import Path

import pytest
import yaml
from harness import REPO
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app.app import build_app
from serve_app.config import AppArgs, BatchingConfig, RequestLimits, batching_advice

CONFIGS = sorted([REPO / "serve_config.yaml", *(REPO / "configs").glob("*.yaml")])


def test_there_are_configs_for_production_demo_and_other_models():
    names = {path.name for path in CONFIGS}
    assert {"serve_config.yaml", "cpu-demo.yaml", "sd15-gpu.yaml", "sdxl-turbo-gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_passes_rays_schema_and_ours(path: Path):
    raw = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(raw)
    for app in raw["applications"]:
        assert app["import_path"] == "serve_app.app:build_app"
        AppArgs.model_validate(app["args"])
        deployments = {d["name"]: d for d in app["deployments"]}
        assert set(deployments) <= {"Ingress", "ImageGenerator"}, f"unknown deployment names {set(deployments)}"
        generator = deployments["ImageGenerator"]
        batching = BatchingConfig.model_validate(generator["user_config"])
        assert generator["max_ongoing_requests"] >= batching.max_batch_size, "ongoing requests would cap batches"
        if "autoscaling_config" in generator:
            target = generator["autoscaling_config"]["target_ongoing_requests"]
            assert batching_advice(batching.max_batch_size, generator["max_ongoing_requests"], target) == []
        assert deployments["Ingress"]["max_ongoing_requests"] > generator["max_ongoing_requests"]


def test_production_config_serves_a_real_model_on_autoscaled_gpus():
    app = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]
    assert not AppArgs.model_validate(app["args"]).model.startswith("synthetic:")
    generator = next(d for d in app["deployments"] if d["name"] == "ImageGenerator")
    assert generator["ray_actor_options"]["num_gpus"] == 1
    assert generator["autoscaling_config"]["max_replicas"] > generator["autoscaling_config"]["min_replicas"]
    assert generator["max_queued_requests"] > 0


def test_demo_config_stays_on_loopback_and_offline():
    raw = yaml.safe_load((REPO / "configs" / "cpu-demo.yaml").read_text())
    assert raw["http_options"]["host"] == "127.0.0.1"
    assert raw["applications"][0]["args"]["model"] == "synthetic:tiny"


def test_unknown_keys_are_rejected_with_their_path():
    with pytest.raises(ValueError) as info:
        build_app({"model": "synthetic:tiny", "pipeline": {"devcie": "cpu"}, "limts": {}})
    message = str(info.value)
    assert "args.pipeline.devcie: unknown key" in message and "args.limts: unknown key" in message


def test_bad_model_source_is_rejected_at_build_time():
    with pytest.raises(ValueError, match="unknown synthetic preset 'huge'"):
        build_app({"model": "synthetic:huge"})


@pytest.mark.parametrize(
    ("batch", "max_ongoing", "target", "says"),
    [
        (16, 32, 16, []),
        (16, 32, 32, []),
        (8, 16, None, []),
        (16, 32, 4, ["below user_config.max_batch_size (16)", "at least 16"]),
        (8, 16, 24, ["above max_ongoing_requests (16)"]),
    ],
)
def test_batching_advice_keeps_target_between_batch_size_and_max_ongoing(batch, max_ongoing, target, says):
    advice = " ".join(batching_advice(batch, max_ongoing, target))
    assert all(text in advice for text in says) and bool(advice) == bool(says), advice


def test_batching_config_bounds():
    with pytest.raises(ValidationError):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(ValidationError):
        BatchingConfig(batch_wait_timeout_s=-1)
    with pytest.raises(ValidationError, match="extra"):
        BatchingConfig.model_validate({"max_batch": 4})


def test_limits_must_be_consistent():
    with pytest.raises(ValidationError, match="min_size"):
        RequestLimits(min_size=512, max_width=256)
