"""OpenAI Images API compatibility, checked with the official `openai` package, unmodified, over the
app in-process (its HTTP client is Starlette's TestClient) with a fake Generator. What the real
model makes through these routes is checked in tests/e2e/test_api_openai.py."""

from __future__ import annotations

import time

import openai
import pytest
from helpers import decode, pixels, png_bytes


@pytest.fixture
def oai(client):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def test_generate_with_the_official_client(oai, generator):
    before = int(time.time())
    result = oai.images.generate(
        prompt="a watercolor fox",
        n=2,
        size="128x64",
        response_format="b64_json",
        model="dall-e-3",  # OpenAI's fields that mean nothing here are accepted
        user="u1",
        quality="standard",
        style="vivid",
    )
    assert before <= result.created <= int(time.time())
    assert len(result.data) == 2 and result.data[0].revised_prompt is None
    pictures = [decode(item.b64_json) for item in result.data]
    assert all(p.size == (128, 64) and p.format == "PNG" for p in pictures)
    assert [item.seed for item in result.data] == [job.seed for job in generator.jobs]
    assert result.data[1].seed == result.data[0].seed + 1
    assert not (pixels(pictures[0]) == pixels(pictures[1])).all()
    assert (result.size, result.output_format) == ("128x64", "png")


def test_size_auto_or_left_out_is_the_models_default(oai, generator):
    for size in ("auto", None):
        kwargs = {"size": size} if size else {}
        assert decode(oai.images.generate(prompt="x", **kwargs).data[0].b64_json).size == (64, 64)
    assert {(job.params.width, job.params.height) for job in generator.jobs} == {(None, None)}


def test_extensions_through_extra_body_reach_the_generator(oai, generator):
    extensions = {
        "seed": 42,
        "num_inference_steps": 3,
        "negative_prompt": "fog",
        "guidance_scale": 5.0,
        "scheduler": "euler_a",
    }
    result = oai.images.generate(prompt="a fox", size="64x64", extra_body=extensions)
    [job] = generator.jobs
    assert {k: getattr(job.params, k) for k in extensions} == extensions
    assert result.data[0].seed == 42
    assert "Steps: 3, Sampler: Euler a, CFG scale: 5, Seed: 42" in decode(result.data[0].b64_json).info["parameters"]


def test_output_format_and_compression(oai):
    high = oai.images.generate(prompt="x", extra_body={"output_format": "jpeg", "output_compression": 95, "seed": 1})
    low = oai.images.generate(prompt="x", extra_body={"output_format": "jpeg", "output_compression": 5, "seed": 1})
    assert decode(high.data[0].b64_json).format == "JPEG"
    assert len(low.data[0].b64_json) < len(high.data[0].b64_json)


def test_edit_is_image_to_image_on_the_uploaded_image(oai, generator):
    result = oai.images.edit(
        image=("in.png", png_bytes((128, 64), seed=4), "image/png"),
        prompt="at night",
        extra_body={"strength": 0.5, "seed": 1},
    )
    assert decode(result.data[0].b64_json).size == (128, 64)
    [job] = generator.jobs
    assert job.kind == "img2img" and job.init_image.shape == (64, 128, 3)
    assert (job.params.prompt, job.params.strength, job.seed) == ("at night", 0.5, 1)


def test_edit_with_a_mask_that_is_no_image_is_422_naming_it(oai, generator):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        oai.images.edit(image=("in.png", png_bytes(), "image/png"), prompt="x", mask=("m.png", b"junk", "image/png"))
    assert info.value.body["param"] == "mask"  # masks that are images: tests/unit/test_routes_edits.py
    assert generator.jobs == []


def test_models_lists_and_retrieves_the_served_models(oai, service):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["synthetic:tiny", "synthetic:tiny-flux-schnell"]
    served = oai.models.retrieve("synthetic:tiny")
    assert served.id == "synthetic:tiny" and served.created == service.started_at
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("dall-e-3")
    assert info.value.body["code"] == "model_not_found" and "synthetic:tiny" in info.value.body["message"]


@pytest.mark.parametrize(
    ("kwargs", "param", "says"),
    [
        ({"size": "500x500"}, "size", "multiples of 8"),
        ({"size": "huge"}, "size", "256x256"),
        ({"size": "1024x1024"}, "size", "from 64 to 256"),
        ({"n": 5}, "n", "between 1 and 4"),
        ({"response_format": "url"}, "response_format", "b64_json"),
        ({"extra_body": {"num_inference_steps": 51}}, "num_inference_steps", "between 1 and 50"),
    ],
)
def test_errors_come_in_openais_shape_naming_openais_field(oai, generator, kwargs, param, says):
    with pytest.raises(openai.APIStatusError) as info:
        oai.images.generate(prompt="x", **kwargs)
    error = info.value.body
    assert info.value.status_code == 422
    assert error["param"] == param and error["type"] == "invalid_request_error" and says in error["message"]
    assert error["code"] == "invalid_request"
    assert info.value.response.headers["x-request-id"]
    assert generator.jobs == []


def test_missing_prompt_is_an_openai_shaped_validation_error(client):
    response = client.post("/v1/images/generations", json={"n": 1})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "prompt"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "request_id" not in response.json()  # OpenAI's envelope has only "error"
