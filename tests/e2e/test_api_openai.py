"""OpenAI Images API compatibility, checked with the official `openai` package, unmodified."""

from __future__ import annotations

import openai
import pytest
from helpers import decode, max_diff, png_bytes


@pytest.fixture
def oai(demo_server):
    return openai.OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_generate_with_the_official_client(oai):
    result = oai.images.generate(
        prompt="a watercolor fox",
        n=2,
        size="128x64",
        response_format="b64_json",
        model="dall-e-3",
        user="u1",
        quality="standard",
    )
    assert result.created > 0 and len(result.data) == 2
    pictures = [decode(item.b64_json) for item in result.data]
    assert all(p.size == (128, 64) for p in pictures)
    assert result.data[0].revised_prompt is None
    assert max_diff(*pictures) > 10  # each image its own seed


def test_extensions_through_extra_body_make_it_reproducible(oai):
    ask = dict(
        prompt="a fox", size="64x64", extra_body={"seed": 42, "num_inference_steps": 3, "negative_prompt": "fog"}
    )
    a, b = (decode(oai.images.generate(**ask).data[0].b64_json) for _ in range(2))
    assert max_diff(a, b) <= 1


def test_output_format_jpeg(oai):
    result = oai.images.generate(prompt="x", extra_body={"output_format": "jpeg", "output_compression": 50})
    assert decode(result.data[0].b64_json).format == "JPEG"


def test_edit_is_image_to_image(oai):
    result = oai.images.edit(
        image=("in.png", png_bytes((64, 64)), "image/png"), prompt="at night", extra_body={"strength": 0.5, "seed": 1}
    )
    assert decode(result.data[0].b64_json).size == (64, 64)


def test_models_lists_the_served_model(oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["synthetic:tiny"]
    assert oai.models.retrieve("synthetic:tiny").id == "synthetic:tiny"
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("dall-e-3")
    assert info.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("kwargs", "param", "says"),
    [
        ({"size": "500x500"}, "size", "multiples of 8"),
        ({"size": "huge"}, "size", "256x256"),
        ({"size": "1024x1024"}, "size", "between 64 and 256"),
        ({"n": 5}, "n", "between 1 and 4"),
        ({"response_format": "url"}, "response_format", "b64_json"),
    ],
)
def test_errors_come_in_openais_shape(oai, kwargs, param, says):
    with pytest.raises(openai.APIStatusError) as info:
        oai.images.generate(prompt="x", **kwargs)
    error = info.value.body
    assert info.value.status_code == 422
    assert error["param"] == param and error["type"] == "invalid_request_error" and says in error["message"]
    assert info.value.response.headers["x-request-id"]


def test_missing_prompt_is_an_openai_shaped_validation_error(client):
    response = client.post("/v1/images/generations", json={"n": 1})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "prompt"
    assert response.json()["error"]["type"] == "invalid_request_error"
