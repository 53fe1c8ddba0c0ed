"""A 422 states the field's whole rule, so that one fix is enough: a width of 300 is told "a multiple of 8
from 64 to 256", not only "a multiple of 8" (and then, at 512, the range). The rule is read from the
field's declarations, with this deployment's range (configs/cpu-demo.yaml: 64-256 pixels, 1-50 steps,
guidance 0-30, 1-4 images) in place of the schema's outer one. Against the FastAPI app over a fake
Generator (tests/fake_generation.py), no Ray."""

from __future__ import annotations

from typing import Annotated

import pytest
from helpers import png_bytes
from pydantic import BaseModel, Field, ValidationError

from serve_app.config import RequestLimits
from serve_app.service.validation import validation_problems

DEMO_LIMITS = RequestLimits(min_size=64, max_width=256, max_height=256, max_pixels=65536, max_steps=50)


def problem(response) -> dict:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    return {"field": error["field"], "message": error["message"]}


@pytest.mark.parametrize(
    ("fields", "field", "rule"),
    [
        # Off the step: the message names the range too, not only the step.
        ({"width": 300}, "width", "width: must be a multiple of 8 from 64 to 256 (got 300)"),
        # Past the schema's own bound (4096): the deployment's range, and the step too.
        ({"width": 5000}, "width", "width: must be a multiple of 8 from 64 to 256 (got 5000)"),
        ({"height": 4}, "height", "height: must be a multiple of 8 from 64 to 256 (got 4)"),
        ({"num_inference_steps": 0}, "num_inference_steps", "num_inference_steps: must be between 1 and 50 (got 0)"),
        ({"guidance_scale": 500}, "guidance_scale", "guidance_scale: must be between 0 and 30 (got 500)"),
        ({"num_images": 100}, "num_images", "num_images: must be between 1 and 4 (got 100)"),
        ({"seed": -5}, "seed", "seed: must be between 0 and 4294967295 (got -5)"),
        ({"seed": 2**32}, "seed", "seed: must be between 0 and 4294967295 (got 4294967296)"),
        ({"quality": 0}, "quality", "quality: must be between 1 and 100 (got 0)"),
        (
            {"loras": [{"name": "ink", "scale": 50}]},
            "loras.0.scale",
            "loras.0.scale: must be between -10 and 10 (got 50)",
        ),
    ],
)
def test_a_number_out_of_its_rule_is_told_the_whole_rule(client, fields, field, rule):
    assert problem(client.post("/generate", json={"prompt": "x", **fields})) == {"field": field, "message": rule}


def test_a_value_that_is_not_a_number_is_told_so_and_the_rule_too(client):
    width = problem(client.post("/generate", json={"prompt": "x", "width": "wide"}))["message"]
    assert "valid integer" in width and width.endswith("must be a multiple of 8 from 64 to 256")
    steps = problem(client.post("/generate", json={"prompt": "x", "num_inference_steps": 2.5}))["message"]
    assert "fractional part" in steps and steps.endswith("must be between 1 and 50")


def test_minus_one_for_a_random_seed_is_told_the_rule_and_how_to_ask_for_one(client):
    message = problem(client.post("/generate", json={"prompt": "x", "seed": -1}))["message"]
    assert message == "seed: must be between 0 and 4294967295; leave seed out (or send null) for a random seed"


def test_image_to_image_states_strength_and_size_rules_as_json_and_as_a_form(client):
    body = {"prompt": "x", "init_image": "aGVsbG8=", "strength": 0, "width": 300}
    as_json = client.post("/img2img", json=body).json()["error"]["message"]
    init = {"init_image": ("in.png", png_bytes((64, 64)), "image/png")}
    as_form = client.post("/img2img", files=init, data={"prompt": "x", "strength": "1.5", "width": "300"})
    for message, strength in ((as_json, "0"), (as_form.json()["error"]["message"], "1.5")):
        assert "width: must be a multiple of 8 from 64 to 256 (got 300)" in message
        assert f"strength: must be greater than 0 and at most 1 (got {strength})" in message


def test_entries_of_a_many_prompt_request_are_told_the_rule_at_their_place(client):
    response = client.post("/generate/prompts", json={"requests": [{"prompt": "a"}, {"prompt": "b", "width": 12}]})
    assert problem(response) == {
        "field": "requests.1.width",
        "message": "requests.1.width: must be a multiple of 8 from 64 to 256 (got 12)",
    }


def test_the_other_api_families_and_query_parameters_state_whole_rules_in_their_own_names(client):
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 5000, "width": 300}).json()["error"]
    assert "steps: must be between 1 and 50 (got 5000)" in a1111["message"]
    assert "width: must be a multiple of 8 from 64 to 256 (got 300)" in a1111["message"]
    openai = client.post("/v1/images/generations", json={"prompt": "x", "n": 9}).json()["error"]
    assert openai["param"] == "n" and openai["message"] == "n: must be between 1 and 4 (got 9)"
    listing = problem(client.get("/jobs", params={"limit": 500}))
    assert listing == {"field": "limit", "message": "limit: must be between 1 and 200 (got 500)"}


# -- validation_problems itself: any model's declarations, not a list of known fields ------------------


class Probe(BaseModel):
    ratio: Annotated[float, Field(gt=0, lt=1)]
    pairs: int | None = Field(None, ge=2, multiple_of=2)
    ceiling: int = Field(0, le=9)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ratio": 1}, "ratio: must be greater than 0 and less than 1 (got 1)"),
        ({"ratio": 0.5, "pairs": 3}, "pairs: must be a multiple of 2, at least 2 (got 3)"),
        ({"ratio": 0.5, "ceiling": 10}, "ceiling: must be at most 9 (got 10)"),
    ],
)
def test_the_rule_is_read_from_whatever_the_model_declares(fields, message):
    with pytest.raises(ValidationError) as raised:
        Probe.model_validate(fields)
    [found] = validation_problems(raised.value.errors(), fields={"body": [(Probe, [])]})
    assert f"{found['field']}: {found['message']}" == message


def test_without_a_model_the_shared_image_parameters_rules_apply_as_bulk_rows_are_checked():
    from serve_app.pipeline.params import ImageParams

    with pytest.raises(ValidationError) as raised:
        ImageParams.model_validate({"prompt": "x", "width": 30, "strength": 2})
    problems = validation_problems(raised.value.errors(), limits=DEMO_LIMITS)
    assert problems == [
        {"field": "width", "message": "must be a multiple of 8 from 64 to 256 (got 30)"},
        {"field": "strength", "message": "must be greater than 0 and at most 1 (got 2)"},
    ]
