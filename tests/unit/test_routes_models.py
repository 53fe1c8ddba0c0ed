"""Several models at the ingress, over a fake Generator: which model a request gets, the limits it is
checked against (each model's own), how its call is routed, and what /models and /openapi.json say."""

from __future__ import annotations

import pytest
from fake_generation import FakeGenerationService, demo_settings
from helpers import png_bytes

from serve_app.config import AppArgs


def two_models() -> AppArgs:
    """The demo's limits (64-256 px, 50 steps) for "tiny"; "wide" allows 512 px wide and 100 steps."""
    args = demo_settings().model_dump(exclude={"model", "refiner", "controlnets"})
    args["models"] = [
        {"id": "tiny", "model": "synthetic:tiny"},
        {
            "id": "wide",
            "model": "synthetic:tiny",
            "limits": {"max_width": 512, "max_pixels": 512 * 256, "max_steps": 100},
        },
    ]
    return AppArgs.model_validate(args)


@pytest.fixture
def service() -> FakeGenerationService:
    return FakeGenerationService(two_models())


def test_each_model_is_checked_against_its_own_limits_and_the_error_says_whose(client, generator):
    wide = client.post("/generate", json={"prompt": "p", "model": "wide", "width": 512, "num_inference_steps": 80})
    assert wide.status_code == 200, wide.text
    assert wide.headers["x-model"] == "wide" and generator.routed_to == ["wide"]

    refused = client.post("/generate", json={"prompt": "p", "width": 512})  # the default model, "tiny"
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert (
        error["field"] == "width"
        and error["message"] == "width: must be a multiple of 8 from 64 to 256 for model 'tiny' (got 512)"
    )
    steps = client.post("/generate", json={"prompt": "p", "model": "wide", "num_inference_steps": 101})
    assert (
        steps.json()["error"]["message"] == "num_inference_steps: must be between 1 and 100 (got 101)"
    )  # the widest: no model named
    assert len(generator.jobs) == 1  # refused requests never reach the Generator


def test_an_unknown_model_is_refused_listing_the_available_ones(client, generator):
    response = client.post("/generate", json={"prompt": "p", "model": "nope"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["field"], error["message"]) == ("model", "model: unknown model 'nope'; available: tiny, wide")
    assert generator.jobs == []


def test_image_to_image_fits_the_init_image_inside_its_models_limits(client, generator):
    upload = png_bytes((1024, 256))  # 4:1
    for model, size in (("tiny", (256, 64)), ("wide", (512, 128))):
        response = client.post("/img2img", data={"prompt": "p", "model": model}, files={"init_image": upload})
        assert response.status_code == 200, response.text
        height, width = generator.jobs[-1].init_image.shape[:2]  # resized to the size the image gets
        assert (width, height) == size


def test_models_lists_each_models_limits_and_openapi_publishes_the_widest_naming_narrower_ones(client):
    listed = {m["id"]: m["limits"] for m in client.get("/models").json()["models"]}
    assert (listed["tiny"]["max_width"], listed["wide"]["max_width"]) == (256, 512)
    assert listed["wide"]["max_steps"] == 100 and "max_body_bytes" not in listed["wide"]
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert [bound.get("maximum") for bound in schemas["GenerateRequest"]["properties"]["width"]["anyOf"]] == [512, None]
    # The widest bounds are published; each request's `model` says which model allows less.
    says = "Models here: tiny (default): width 64–256, num_inference_steps 1–50; wide"
    assert says in schemas["GenerateRequest"]["properties"]["model"]["anyOf"][0]["description"]
    assert says in schemas["ImageGenerationRequest"]["properties"]["model"]["description"]  # OpenAI's
    assert "Models here" not in str(schemas["JobView"]["properties"]["model"])  # a response: any model it ran
