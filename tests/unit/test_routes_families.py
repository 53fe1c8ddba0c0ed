"""Models of several families at the ingress (a UNet and FLUX.1), over a fake Generator: each model's family
named where models are listed, and AUTOMATIC1111 callers' Forge words for FLUX.1 mapped onto ours."""

from __future__ import annotations

import pytest
from fake_generation import FakeGenerationService, demo_settings

from serve_app.config import AppArgs


def unet_and_flux() -> AppArgs:
    args = demo_settings().model_dump(exclude={"model", "refiner", "controlnets"})
    args["models"] = [
        {"id": "sd", "model": "synthetic:tiny"},
        {"id": "flux", "model": "synthetic:tiny-flux-dev"},
        {"id": "sd3", "model": "synthetic:tiny-sd3"},
    ]
    return AppArgs.model_validate(args)


@pytest.fixture
def service() -> FakeGenerationService:
    return FakeGenerationService(unet_and_flux())


def test_models_and_a1111_model_list_name_each_models_family(client):
    assert {m["id"]: m["family"] for m in client.get("/models").json()["models"]} == {
        "sd": "unet",
        "flux": "flux",
        "sd3": "sd3",
    }
    assert {m["model_name"]: m["family"] for m in client.get("/sdapi/v1/sd-models").json()} == {
        "sd": "unet",
        "flux": "flux",
        "sd3": "sd3",
    }


def _a1111(client, **fields):
    body = {"prompt": "a fox", "seed": 1, **fields}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text


def test_forge_flux_fields_become_guidance_embedding_and_true_cfg(client, generator):
    _a1111(client, override_settings={"sd_model_checkpoint": "flux"}, distilled_cfg_scale=3.5, cfg_scale=4)
    [task] = generator.jobs
    assert (task.params.guidance_scale, task.params.true_cfg_scale) == (3.5, 4.0)
    generator.jobs.clear()
    _a1111(client, override_settings={"sd_model_checkpoint": "flux"}, distilled_cfg_scale=2.0, cfg_scale=1)
    [task] = generator.jobs
    assert (task.params.guidance_scale, task.params.true_cfg_scale) == (2.0, None)  # cfg 1: no real guidance


@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_a1111_sampler_names_mean_their_flow_twins_on_flow_models(client, generator, model):
    _a1111(client, override_settings={"sd_model_checkpoint": model}, sampler_name="Euler")
    _a1111(client, override_settings={"sd_model_checkpoint": model}, sampler_name="DPM++ 2M")
    assert [task.params.scheduler for task in generator.jobs] == ["flow_euler", "flow_dpmpp_2m"]


def test_a1111_sampler_names_keep_their_meaning_on_unet_models(client, generator):
    _a1111(client, override_settings={"sd_model_checkpoint": "sd"}, sampler_name="Euler")
    _a1111(client, sampler_name="Euler (flow)")  # our own name for the flow sampler is taken as it is
    assert [task.params.scheduler for task in generator.jobs] == ["euler", "flow_euler"]
