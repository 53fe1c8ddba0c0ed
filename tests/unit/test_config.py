import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from harness import REPO
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app.app import build_app
from serve_app.config import AppArgs, BatchingConfig, RequestLimits, check_serve_config

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
        assert deployments["Ingress"]["max_ongoing_requests"] > deployments["ImageGenerator"]["max_ongoing_requests"]
    assert check_serve_config(raw) == []


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
    sources = [model["model"] for model in raw["applications"][0]["args"]["models"]]
    assert sources == ["synthetic:tiny", "synthetic:tiny-flux-schnell"]  # random weights only: no download


def test_unknown_keys_are_rejected_with_their_path():
    with pytest.raises(ValueError) as info:
        build_app({"model": "synthetic:tiny", "pipeline": {"devcie": "cpu"}, "limts": {}})
    message = str(info.value)
    assert "args.pipeline.devcie: unknown key" in message and "args.limts: unknown key" in message


def test_bad_model_source_is_rejected_at_build_time():
    with pytest.raises(ValueError, match="unknown synthetic preset 'huge'"):
        build_app({"model": "synthetic:huge"})


def serve_config(batch: int, max_ongoing: int | None, target: float | None, args: dict | None = None) -> dict:
    generator = {"name": "ImageGenerator", "user_config": {"max_batch_size": batch}, "max_queued_requests": 1024}
    if max_ongoing is not None:
        generator["max_ongoing_requests"] = max_ongoing
    if target is not None:
        generator["autoscaling_config"] = {"target_ongoing_requests": target}
    ingress = {"name": "Ingress", "max_ongoing_requests": 512, "max_queued_requests": 64}
    return {"applications": [{"name": "sd", "args": args or {}, "deployments": [ingress, generator]}]}


@pytest.mark.parametrize(
    ("batch", "max_ongoing", "target", "says"),
    [
        (16, 32, 16, []),
        (16, 32, 32, []),
        (8, 16, None, []),
        (8, None, None, []),  # the deployment's own default holds a batch
        (16, 32, 4, ["below user_config.max_batch_size (16)", "at least 16"]),
        (8, 16, 24, ["above max_ongoing_requests (16)"]),
        (16, 8, None, ["caps every batch at 8", "at least 16"]),
    ],
)
def test_config_check_keeps_batch_below_target_below_max_ongoing(batch, max_ongoing, target, says):
    problems = " ".join(check_serve_config(serve_config(batch, max_ongoing, target)))
    assert all(text in problems for text in says) and bool(problems) == bool(says), problems


@pytest.mark.slow  # seconds: out of the fast loop
def test_config_check_names_bad_args_and_its_command_exits_1(tmp_path):
    problems = check_serve_config(serve_config(8, 32, None, {"limits": {"max_stepz": 3}}))
    assert problems and "applications[sd].args.limits.max_stepz: unknown key" in problems[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(serve_config(16, 8, None)))
    done = subprocess.run([sys.executable, "-m", "serve_app.config", str(bad)], capture_output=True, text=True)
    assert done.returncode == 1 and "caps every batch at 8" in done.stderr
    good = subprocess.run([sys.executable, "-m", "serve_app.config", str(REPO / "configs" / "cpu-demo.yaml")])
    assert good.returncode == 0


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


def test_config_check_refuses_limits_that_cannot_fire_or_fire_in_the_wrong_order():
    config = serve_config(8, 32, None, {"limits": {"request_timeout_s": 60, "max_concurrent_requests": 600}})
    config["http_options"] = {"request_timeout_s": 60}
    del config["applications"][0]["deployments"][1]["max_queued_requests"]
    problems = "\n".join(check_serve_config(config))
    assert "request_timeout_s (60) must be below http_options.request_timeout_s (60)" in problems
    assert "max_concurrent_requests (600) must be below the Ingress's max_ongoing_requests (512)" in problems
    assert "ImageGenerator: set max_queued_requests" in problems
    assert "Ingress: set max_queued_requests" not in problems


# -- several models ------------------------------------------------------------------------------

TWO_MODELS = [{"id": "a", "model": "synthetic:tiny"}, {"id": "b", "model": "synthetic:tiny", "pipeline": {"seed": 1}}]


def test_each_model_takes_the_shared_options_with_its_own_on_top_and_the_default_comes_first():
    args = AppArgs.model_validate(
        {"models": TWO_MODELS, "default_model": "b", "pipeline": {"device": "cpu"}, "defaults": {"guidance_scale": 2}}
    )
    served = args.served_models()
    assert [m.id for m in served] == ["b", "a"] and args.default_model_id == "b"
    assert [(m.pipeline.device, m.pipeline.seed) for m in served] == [("cpu", 1), ("cpu", 0)]
    assert all(m.defaults.guidance_scale == 2 for m in served)
    # One model: its id is its source, as before.
    assert [m.id for m in AppArgs().served_models()] == ["synthetic:tiny"]


def test_a_model_changes_the_shared_limits_it_names_and_the_api_publishes_the_widest():
    args = AppArgs.model_validate(
        {
            "models": [{**TWO_MODELS[0], "limits": {"max_width": 512, "max_pixels": 512 * 256}}, TWO_MODELS[1]],
            "limits": {"max_width": 256, "max_height": 256, "max_pixels": 65536, "max_steps": 50},
        }
    )
    a, b = args.served_models()
    assert (a.limits.max_width, a.limits.max_height, a.limits.max_pixels, a.limits.max_steps) == (512, 256, 131072, 50)
    assert b.limits == args.limits
    published = args.published_limits()
    assert (published.max_width, published.max_pixels, published.max_steps) == (512, 131072, 50)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"model": "synthetic:tiny", "models": TWO_MODELS}, "either `model`"),
        ({"models": [*TWO_MODELS, TWO_MODELS[0]]}, "id a appears more than once"),
        ({"models": TWO_MODELS, "default_model": "c"}, "default_model 'c' is not among"),
        ({"models": [{"id": "a", "model": "synthetic:tiny", "pipeline": {"devcie": "cpu"}}]}, "models[a].pipeline"),
        ({"models": [{"id": "a b", "model": "synthetic:tiny"}]}, "models.0.id"),
        ({"models": [{"id": "a", "model": "synthetic:tiny", "limits": {"min_size": 2048}}]}, "models[a].limits"),
        ({"models": [{"id": "a", "model": "synthetic:tiny", "limits": {"max_width": 500}}]}, "multiple of 8"),
        ({"models": [{"id": "a", "model": "synthetic:tiny", "limits": {"max_body_bytes": 9}}]}, "models.0.limits"),
    ],
)
def test_incoherent_models_are_refused_naming_what_to_fix(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_app(args)
