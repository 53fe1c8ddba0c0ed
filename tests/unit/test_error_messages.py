"""A newcomer's mistakes get messages that name the fix: this deployment's limits (in errors and in
/openapi.json alike), the name meant by an unknown field, where the JSON broke, the Content-Type
expected. Against the FastAPI app with a fake Generator (tests/fake_generation.py), no Ray."""

from __future__ import annotations

import pytest
from fake_generation import FakeGenerationService, demo_settings
from fastapi.testclient import TestClient

from serve_app.api.asgi import create_api


@pytest.fixture
def http():
    with TestClient(create_api(FakeGenerationService(demo_settings()))) as client:
        yield client


def error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"num_images": 100}, "num_images", "must be between 1 and 4 (got 100)"),  # the schema's own bound is 64
        ({"num_inference_steps": 500}, "num_inference_steps", "must be between 1 and 50 (got 500)"),
        ({"width": 300}, "width", "multiple of 8"),
        ({"width": 512}, "width", "must be a multiple of 8 from 64 to 256 (got 512)"),
        ({"seed": -1}, "seed", "leave seed out (or send null) for a random seed"),
        ({"steps": 4}, "steps", "did you mean num_inference_steps? (steps is the AUTOMATIC1111 API's name"),
        ({"size": "64x64"}, "size", "did you mean width and height? (size is the OpenAI API's name"),
        ({"sampler": "euler"}, "sampler", "did you mean scheduler?"),
        ({"num_inferance_steps": 4}, "num_inferance_steps", "did you mean num_inference_steps?"),
        ({"strength": 0.5}, "strength", "image-to-image only (POST /img2img)"),
    ],
)
def test_each_mistake_gets_a_message_that_names_the_fix(http, body, field, says):
    problem = error(http.post("/generate", json={"prompt": "x", **body}), 422)
    assert problem["field"] == field and says in problem["message"], problem


def test_compatible_apis_state_the_deployment_limits_in_their_own_names(http):
    a1111 = error(http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 5000}), 422)
    assert a1111["field"] == "steps" and "between 1 and 50" in a1111["message"]
    openai = http.post("/v1/images/generations", json={"prompt": "x", "n": 9}).json()["error"]
    assert openai["param"] == "n" and "between 1 and 4" in openai["message"]


@pytest.mark.parametrize(
    ("content", "content_type", "status", "says"),
    [
        ('{"prompt": "x",, }', "application/json", 400, "not valid JSON: Expecting property name"),
        ('{\n  "prompt": "x"\n  "seed": 1\n}', "application/json", 400, "at line 3, column 3"),
        ("prompt=x", "text/plain", 415, "Content-Type: application/json (it came with Content-Type text/plain)"),
        ('{"prompt": "x"}', None, 415, "it came with no Content-Type"),
        ("[1, 2]", "application/json", 400, "must be a JSON object"),
    ],
)
def test_bodies_that_are_not_json_objects_say_what_broke_and_where(http, content, content_type, status, says):
    headers = {"content-type": content_type} if content_type else {}
    problem = error(http.post("/generate", content=content, headers=headers), status)
    assert says in problem["message"], problem


@pytest.mark.parametrize("limits", [{}, {"max_width": 128, "max_height": 192, "max_steps": 8, "max_num_images": 2}])
def test_openapi_publishes_this_deployments_limits(limits):
    settings = demo_settings(**limits)
    with TestClient(create_api(FakeGenerationService(settings))) as client:
        schemas = client.get("/openapi.json").json()["components"]["schemas"]
    bounds = settings.limits.bounds()

    def numeric(prop):
        return next(p for p in [prop, *prop.get("anyOf", [])] if p.get("type") in ("integer", "number"))

    native = schemas["GenerateRequest"]["properties"]
    for field in ("width", "height", "num_inference_steps", "num_images"):
        assert (numeric(native[field])["minimum"], numeric(native[field])["maximum"]) == bounds[field], field
    assert numeric(schemas["A1111Txt2ImgRequest"]["properties"]["steps"])["maximum"] == settings.limits.max_steps
    assert native["prompt"]["maxLength"] == settings.limits.max_prompt_chars
