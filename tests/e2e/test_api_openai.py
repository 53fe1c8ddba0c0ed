"""OpenAI Images API through real Serve with the official `openai` package, unmodified: the real
model's images. Shapes, extensions, models and errors: tests/unit/test_routes_openai.py."""

from __future__ import annotations

import openai
import pytest
from helpers import decode, max_diff, png_bytes


@pytest.fixture
def oai(demo_server):
    return openai.OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_generate_with_the_official_client(oai):
    result = oai.images.generate(prompt="a watercolor fox", n=2, size="128x64", response_format="b64_json")
    assert len(result.data) == 2
    pictures = [decode(item.b64_json) for item in result.data]
    assert all(p.size == (128, 64) for p in pictures)
    assert max_diff(*pictures) > 10  # each image its own seed


def test_extensions_through_extra_body_make_it_reproducible(oai):
    ask = dict(
        prompt="a fox", size="64x64", extra_body={"seed": 42, "num_inference_steps": 3, "negative_prompt": "fog"}
    )
    a, b = (decode(oai.images.generate(**ask).data[0].b64_json) for _ in range(2))
    assert max_diff(a, b) <= 1
    other = decode(oai.images.generate(**{**ask, "extra_body": {**ask["extra_body"], "seed": 43}}).data[0].b64_json)
    assert max_diff(a, other) > 10


def test_edit_is_image_to_image(oai):
    image = ("in.png", png_bytes((128, 64)), "image/png")
    weak, strong = (
        decode(
            oai.images.edit(
                image=image, prompt="at night", extra_body={"strength": s, "seed": 1, "num_inference_steps": 10}
            )
            .data[0]
            .b64_json
        )
        for s in (0.3, 0.9)
    )
    assert weak.size == strong.size == (128, 64)
    assert max_diff(weak, strong) > 10
